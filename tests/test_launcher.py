"""`sve train --nproc N`: torchrun's agent started by sve, one line per failure (unit: the lines chosen from
the ranks' records; slow: real two-rank runs that fail on a user error and on a rank killed mid-run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, sentiment_file, write_recipe
from sve_cli.cli import _without_option
from sve_cli.launcher import MESSAGES, PEER_LOST, _failure_lines, record_rank_message


def _records(folder, **ranks):
    for rank, (text, peer_lost) in ranks.items():
        (folder / f"rank-{rank.removeprefix('r')}.json").write_text(json.dumps({"text": text, "peer_lost": peer_lost}))


def _failed(**codes):
    return {int(rank.removeprefix("r")): SimpleNamespace(exitcode=code) for rank, code in codes.items()}


def test_the_same_user_error_on_every_rank_is_said_once_by_rank_0(tmp_path):
    _records(tmp_path, r0=("bad --out", False), r1=("bad --out", False))
    assert _failure_lines(_failed(r0=2, r1=2), tmp_path) == []  # rank 0 printed it at once


def test_a_rank_stopped_by_the_agent_is_a_consequence(tmp_path):
    _records(tmp_path, r1=("bad --out", False))
    assert _failure_lines(_failed(r0=-signal.SIGTERM, r1=2), tmp_path) == ["rank 1: bad --out"]


def test_a_killed_rank_is_the_cause_and_its_peer_is_silent(tmp_path):
    _records(tmp_path, r0=(f"{PEER_LOST} (Connection closed by peer)", True))
    assert _failure_lines(_failed(r0=2, r1=-signal.SIGKILL), tmp_path) == [
        "rank 1 was stopped by SIGKILL (often the out-of-memory killer)"]


def test_a_lost_peer_is_said_when_nothing_else_explains_it(tmp_path):
    _records(tmp_path, r1=(f"{PEER_LOST} (x)", True))
    assert _failure_lines(_failed(r0=-signal.SIGTERM, r1=2), tmp_path) == [f"rank 1: {PEER_LOST} (x)"]


def test_a_rank_that_crashed_points_at_its_traceback(tmp_path):
    _records(tmp_path, r0=(f"{PEER_LOST} (x)", True))
    assert _failure_lines(_failed(r0=2, r1=1), tmp_path) == ["rank 1 failed with exit code 1 (its traceback is above)"]


def test_ranks_record_their_message_only_under_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv(MESSAGES, raising=False)
    assert record_rank_message("x") is False and list(tmp_path.iterdir()) == []
    monkeypatch.setenv(MESSAGES, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    assert record_rank_message("said by rank 0") is False  # rank 0 prints it too
    monkeypatch.setenv("RANK", "1")
    assert record_rank_message("said by rank 1") is True
    assert json.loads((tmp_path / "rank-1.json").read_text()) == {"text": "said by rank 1", "peer_lost": False}


def test_each_rank_gets_the_command_line_without_nproc():
    assert _without_option(["train", "r.yaml", "--nproc", "2", "--out", "x"], "--nproc") == ["train", "r.yaml", "--out", "x"]
    assert _without_option(["train", "--nproc=2", "r.yaml"], "--nproc") == ["train", "r.yaml"]


def _sve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sve_cli", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_two_ranks_failing_say_one_line(text_models, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", text_models["bert"], sentiment_file(tmp_path),
                          train={"max_steps": 4, "eval_every_steps": 2, "batch_size": 8})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = _sve("train", recipe, "--nproc", "2", "--out", mine)
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "holds files that are not an sve run" in errors[0], refused.stderr[-2000:]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    killed = _sve("train", recipe, "--nproc", "2", "--out", tmp_path / "run", env={"SVE_KILL_AT": "checkpoint-write"})
    assert killed.returncode == 2, killed.stderr[-2000:]
    errors = [line for line in killed.stderr.splitlines() if line.startswith("error")]  # beside sve's notices
    assert errors == ["error: rank 0 was stopped by SIGKILL (often the out-of-memory killer)"], killed.stderr[-3000:]
    assert "Traceback" not in killed.stdout + killed.stderr
