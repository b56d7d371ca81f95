"""FSDP on CPU (gloo, 2 ranks): the same Σ bank as one process on the same global batch, with and without
gradient accumulation; a killed sharded run resumes to the same bank; evaluate and predict sharded give
one report and one output file, with the numbers of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, sentiment_file, write_recipe

pytestmark = pytest.mark.slow


def _run(*args, env=None, ranks: int = 1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "sve_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


def _assert_same_bank(expected_path, actual_path, tolerance=1e-5):
    expected, actual = load_file(expected_path), load_file(actual_path)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=tolerance, msg=name)


@pytest.fixture(scope="module")
def setting(text_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SVE_HOME": str(root / "home")}
    data = sentiment_file(root)
    return root, env, data, text_models["bert-nodrop"]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_sharded_ranks_give_one_process_bank(setting, accumulation):
    """The same maths in another order of float sums: Adam divides each gradient by its own scale, so the
    rounding of a near-zero gradient moves its value by up to ~lr·1e-3; at lr 1e-3 every value agrees to 1e-5
    (a wrong reduction, a missed or doubled micro-batch, would move many values by ~lr)."""
    root, env, data, model = setting
    recipe = write_recipe(root / f"r{accumulation}.yaml", model, data, ensemble={"strategy": "factored"},
                          train={"max_steps": 3, "eval_every_steps": 3, "batch_size": 8 // accumulation, "lr": 1e-3,
                                 "gradient_accumulation": accumulation, "parallelism": "fsdp"})
    single = _run("train", recipe, "--out", root / f"single{accumulation}", env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = _run("train", recipe, "--out", root / f"fsdp{accumulation}", env=env, ranks=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    _assert_same_bank(root / f"single{accumulation}" / "sigma_bank.safetensors",
                      root / f"fsdp{accumulation}" / "sigma_bank.safetensors")
    lines = [json.loads((root / name / "metrics.jsonl").read_text().splitlines()[-1])
             for name in (f"single{accumulation}", f"fsdp{accumulation}")]
    assert lines[0]["accuracy"] == lines[1]["accuracy"] and lines[0]["nll"] == pytest.approx(lines[1]["nll"], abs=1e-6)
    assert lines[0]["train_loss"] == pytest.approx(lines[1]["train_loss"], abs=1e-5)  # the mean over both ranks' rows


@pytest.fixture(scope="module")
def sharded_run(setting):
    """A run trained by 2 FSDP ranks, uninterrupted: its recipe and directory."""
    root, env, data, model = setting
    recipe = write_recipe(root / "resume.yaml", model, data, ensemble={"strategy": "factored"},
                          train={"max_steps": 6, "eval_every_steps": 2, "batch_size": 8, "parallelism": "fsdp"})
    reference = _run("train", recipe, "--out", root / "uninterrupted", env=env, ranks=2)
    assert reference.returncode == 0, reference.stderr[-2000:]
    return recipe, root / "uninterrupted"


def test_a_killed_sharded_run_resumes_to_the_same_bank(setting, sharded_run):
    root, env, data, model = setting
    recipe, uninterrupted = sharded_run
    killed = _run("train", recipe, "--out", root / "killed", env={**env, "SVE_KILL_AT": "checkpoint-write:2"}, ranks=2)
    assert killed.returncode != 0 and json.loads((root / "killed" / "trainer_state.json").read_text())["step"] == 2
    resumed = _run("train", recipe, "--out", root / "killed", "--resume", env=env, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_bank(uninterrupted / "sigma_bank.safetensors", root / "killed" / "sigma_bank.safetensors", tolerance=0)


def test_evaluate_and_predict_sharded_give_one_report_and_one_file(setting, sharded_run, tmp_path):
    env, run = setting[1], sharded_run[1]
    alone = _run("evaluate", run, "--report", tmp_path / "one", "--save-predictions", "--ood", "tweets",
                 "--max-examples", "25", env=env)
    sharded = _run("evaluate", run, "--report", tmp_path / "two", "--save-predictions", "--ood", "tweets",
                   "--max-examples", "25", "--overwrite", env=env, ranks=2)
    assert alone.returncode == sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout.count("in-distribution:") == 1  # rank 0 alone prints and writes
    one, two = load_file(tmp_path / "one" / "predictions.safetensors"), load_file(tmp_path / "two" / "predictions.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the film was great", "awful meal", "a trip")))
    for ranks, out in ((1, tmp_path / "p1.jsonl"), (2, tmp_path / "p2.jsonl")):
        done = _run("predict", run, "--data", new, "--out", out, env=env, ranks=ranks)
        assert done.returncode == 0, done.stderr[-2000:]
    rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (tmp_path / "p1.jsonl", tmp_path / "p2.jsonl")]
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]] and len(rows[1]) == 3
    for a, b in zip(*rows):
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-6 for k in a["probabilities"])
