"""Faults: SIGKILL at exact moments (fault points) and at seeded random moments, restart, same
result; readers never see a partial file; concurrent commands on one output; and memory:
decompose's and export's peak RSS follow the largest tensor, not the checkpoint."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, sentiment_file

KILLS = int(os.environ.get("SVE_KILLS", "8"))
KILLED = -signal.SIGKILL


def _assert_no_partial_files(directory: Path) -> None:
    """Every visible file is whole: safetensors parse and read, JSON parses."""
    from sve_cli.writing import visible_entries

    for path in visible_entries(directory):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_tensor(name)
        elif path.suffix in (".json", ".jsonl"):
            for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
                json.loads(line)


def _files(directory: Path) -> dict[str, bytes]:
    from sve_cli.writing import visible_entries

    return {p.name: p.read_bytes() for p in visible_entries(directory)}


def _run(command: list[str], kill_at: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "SVE_KILL_AT"}
    if kill_at:
        env["SVE_KILL_AT"] = kill_at
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, **kwargs)


def _kill_repeatedly(command_for, directory: Path, seed: int, delays: tuple[float, float]) -> list[int]:
    """Start, SIGKILL after a seeded random delay, check the files, restart — KILLS times. Every
    attempt must either finish (0) or die by the kill: an error exit (e.g. 2) fails the test."""
    rng = random.Random(seed)
    codes = []
    for attempt in range(KILLS):
        process = subprocess.Popen(command_for(directory), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        try:
            process.wait(timeout=rng.uniform(*delays))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
        stderr = process.communicate()[1]
        assert process.returncode in (0, KILLED), (attempt, process.returncode, stderr[-2000:])
        codes.append(process.returncode)
        if directory.exists():
            _assert_no_partial_files(directory)
    return codes


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory) -> Path:
    """24 targets of 384×384 in 2 MB shards: many shards, each a few SVDs."""
    model = tmp_path_factory.mktemp("faults") / "model"
    model.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(384, 384, generator=generator)
               for i in range(24)}, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text('{"model_type": "llama"}')
    return model


OPTIONS = ["--targets", "*.q_proj.weight", "--max-shard-size", "2MB"]


def _decompose_command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sve_cli", "decompose", str(model), "--out", str(out), *OPTIONS, *extra]


@pytest.fixture(scope="module")
def reference_cache(llama_like, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "cache"
    assert _run(_decompose_command(llama_like, out)).returncode == 0
    return _files(out)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shard-begun", "shard-begun:3", "before-rename", "before-rename:4",
                                   "before-manifest"])
def test_decompose_killed_at_an_exact_moment_resumes_to_the_same_cache(llama_like, reference_cache, tmp_path, point):
    """shard-begun: a temporary exists, nothing committed; before-rename: a finished shard (or the
    index) not yet renamed; before-manifest: every shard and the index written, decomposition.json not."""
    out = tmp_path / "cache"
    killed = _run(_decompose_command(llama_like, out), kill_at=point)
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    _assert_no_partial_files(out)
    assert not (out / "decomposition.json").exists()
    again = _run(_decompose_command(llama_like, out))
    assert again.returncode == 0, again.stderr
    reused = int(re.search(r"(\d+) reused", again.stdout).group(1))  # targets of shards committed before the kill
    assert (reused > 0) == (point in ("shard-begun:3", "before-rename:4", "before-manifest")), again.stdout
    assert _files(out) == reference_cache
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # leftovers were cleaned up


@pytest.mark.slow
def test_overwrite_always_recovers_a_killed_cache(llama_like, tiny_checkpoints, reference_cache, tmp_path):
    out = tmp_path / "cache"
    assert _run(_decompose_command(llama_like, out), kill_at="shard-begun").returncode == KILLED
    assert {p.name for p in out.iterdir()} - {".sve.lock"} and not _files(out)  # only a temporary is left
    other = _run([sys.executable, "-m", "sve_cli", "decompose", str(tiny_checkpoints["bert"]), "--out", str(out),
                  "--overwrite"])
    assert other.returncode == 0, other.stderr
    assert _run(_decompose_command(llama_like, out)).returncode == 2  # another model's cache now: refused
    assert _run(_decompose_command(llama_like, out, "--overwrite")).returncode == 0
    assert _files(out) == reference_cache


@pytest.mark.slow
def test_decompose_killed_in_its_first_100_ms(llama_like, reference_cache, tmp_path):
    out = tmp_path / "cache"
    process = subprocess.Popen(_decompose_command(llama_like, out), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(0.1)
    process.kill()
    assert process.wait() == KILLED
    assert _run(_decompose_command(llama_like, out)).returncode == 0
    assert _files(out) == reference_cache


@pytest.mark.slow
def test_decompose_survives_seeded_random_sigkills(llama_like, reference_cache, tmp_path):
    codes = _kill_repeatedly(lambda out: _decompose_command(llama_like, out), tmp_path / "killed", seed=1,
                             delays=(0.3, 4.0))
    assert KILLED in codes  # the schedule did kill runs, not only watch them finish
    final = _run(_decompose_command(llama_like, tmp_path / "killed"))
    assert final.returncode == 0, final.stderr
    assert _files(tmp_path / "killed") == reference_cache


@pytest.mark.slow
def test_second_decompose_waits_for_the_first_then_reuses_its_work(llama_like, reference_cache, tmp_path):
    from sve_cli.writing import exclusive

    out = tmp_path / "cache"
    with exclusive(out, "decompose", wait=False):  # "the first process" holds the cache
        second = subprocess.Popen(_decompose_command(llama_like, out), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = second.stderr.readline()  # blocks until the second process says it waits
        assert "waiting for another sve decompose" in line, line
        assert second.poll() is None and not _files(out)  # it waits, and wrote nothing
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert _files(out) == reference_cache


def _train_recipe(text_models, tmp_path: Path, **train) -> Path:
    recipe = {"model": {"path": str(text_models["bert"])},
              "task": {"type": "text_classification", "dataset": str(sentiment_file(tmp_path)), "max_length": 16},
              "ensemble": {"method": "sve", "members": 2},
              "train": {"max_steps": 24, "batch_size": 8, "lr": 1e-2, "eval_every_steps": 8,
                        "checkpoint_every_steps": 3, **train}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sve_cli", "train", str(recipe), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def train_reference(text_models, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One uninterrupted run of `_train_recipe`: its recipe and files."""
    root = tmp_path_factory.mktemp("train_reference")
    recipe = _train_recipe(text_models, root)
    assert _run(_train_command(recipe, root / "reference")).returncode == 0
    return recipe, _files(root / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint-write", "checkpoint-write:4", "before-rename:2"])
def test_train_killed_at_an_exact_moment_resumes_to_the_same_bank(train_reference, tmp_path, point):
    recipe, reference = train_reference
    out = tmp_path / "killed"
    assert _run(_train_command(recipe, out), kill_at=point).returncode == KILLED
    _assert_no_partial_files(out)
    first_checkpoint = (out / "checkpoint.safetensors").exists()
    assert first_checkpoint == (point == "checkpoint-write:4")  # killed before / after its first checkpoint
    if first_checkpoint:  # a run with a checkpoint is continued or replaced only when asked
        refused = _run(_train_command(recipe, out))
        assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = _run(_train_command(recipe, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert ("starting from step 0" in " ".join(resumed.stdout.split())) == (not first_checkpoint)
    killed = _files(out)
    for name in ("sigma_bank.safetensors", "metrics.jsonl", "recipe.yaml"):
        assert killed[name] == reference[name], name


@pytest.mark.slow
def test_train_survives_seeded_random_sigkills(text_models, tmp_path):
    recipe = _train_recipe(text_models, tmp_path, max_steps=60, eval_every_steps=20)
    assert _run(_train_command(recipe, tmp_path / "reference")).returncode == 0

    def command(out):
        return _train_command(recipe, out, "--resume" if (out / "recipe.yaml").exists() else "--overwrite")

    codes = _kill_repeatedly(command, tmp_path / "killed", seed=2, delays=(0.5, 6.0))
    assert KILLED in codes
    final = _run(command(tmp_path / "killed"))
    assert final.returncode == 0, final.stderr
    reference, killed = _files(tmp_path / "reference"), _files(tmp_path / "killed")
    for name in ("sigma_bank.safetensors", "metrics.jsonl", "recipe.yaml"):
        assert killed[name] == reference[name], name


def test_second_train_into_the_same_run_is_refused_in_one_line(sve, text_models, tmp_path):
    from conftest import assert_one_error_line
    from sve_cli.writing import exclusive

    recipe = _train_recipe(text_models, tmp_path)
    with exclusive(tmp_path / "run", "train", wait=False):  # "the first process" is training
        result = sve("train", recipe, "--out", tmp_path / "run")
    assert_one_error_line(result, "is in use by another sve train")
    assert not _files(tmp_path / "run")
    # the first run has written its recipe but not yet its first checkpoint (a stub): the refused
    # second one must leave it alone, or the first run ends without a recipe
    from sve_cli.recipe import load_recipe, recipe_yaml

    stub = tmp_path / "started"
    stub.mkdir()
    (stub / "recipe.yaml").write_text(recipe_yaml(load_recipe(recipe)))
    before = (stub / "recipe.yaml").read_bytes()
    with exclusive(stub, "train", wait=False):
        for extra in ([], ["--overwrite"]):
            assert_one_error_line(sve("train", recipe, "--out", stub, *extra), "is in use by another sve train")
    assert (stub / "recipe.yaml").read_bytes() == before


def test_resume_of_a_directory_without_a_run_is_refused(sve, text_models, tmp_path):
    from conftest import assert_one_error_line

    recipe = _train_recipe(text_models, tmp_path)
    assert_one_error_line(sve("train", recipe, "--out", tmp_path / "nothing", "--resume"), "holds no run to resume")


PEAK = """
import sys
from pathlib import Path
from sve_cli.decompose import decompose, plan_decomposition
decompose(plan_decomposition(sys.argv[1], "*.weight"), Path(sys.argv[2]))
print([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.slow
def test_decompose_memory_follows_the_largest_tensor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    peaks = {}
    for count in (1, 10, 40):  # checkpoints of 1, 10 and 40 targets of 1024×1024 float32 (4 MB each)
        model = tmp_path / f"model{count}"
        model.mkdir()
        save_file({f"layers.{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(count)},
                  str(model / "model.safetensors"), metadata={"format": "pt"})
        (model / "config.json").write_text('{"model_type": "custom"}')
        result = subprocess.run([sys.executable, "-c", PEAK, str(model), str(tmp_path / f"out{count}")],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        peaks[count] = int(result.stdout.strip().splitlines()[-1]) * 1024
    largest = 1024 * 1024 * 4
    # the working set (one tensor in SVD, one being written, LAPACK workspace) is reached by 10
    # targets; 30 more (120 MB of checkpoint, 240 MB of factors) must not add to it. The slack of
    # five tensors covers allocator arenas: a loaded run once measured +16 MB from 10 to 80 targets.
    assert peaks[40] - peaks[10] < 5 * largest, peaks
    assert peaks[40] - peaks[1] < 20 * largest, peaks


EXPORT_PEAK = """
import sys
from pathlib import Path
from sve_cli.export import export_merged
export_merged(Path(sys.argv[1]), Path(sys.argv[2]), member=1)
print([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.slow
def test_export_memory_follows_the_largest_tensor(tmp_path):
    """A 24-layer ViT (hidden 256, MLP 1024: largest tensor 1 MB, ~75 MB of weights) against a
    2-layer one: exporting the big one must not hold its weights in memory."""
    from transformers import ViTConfig, ViTForImageClassification

    from sve_cli.recipe import load_recipe
    from sve_cli.train import train

    peaks = {}
    for layers in (2, 24):
        model = tmp_path / f"vit{layers}"
        torch.manual_seed(0)
        ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=256,
                                            num_hidden_layers=layers, num_attention_heads=4, intermediate_size=1024,
                                            num_labels=10)).save_pretrained(model)
        recipe = tmp_path / f"vit{layers}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": {"path": str(model)},
            "task": {"type": "image_classification", "dataset": "builtin:digits", "max_train_examples": 16,
                     "max_eval_examples": 8},
            "ensemble": {"method": "sve", "members": 2}, "train": {"max_steps": 1, "batch_size": 8}}))
        train(load_recipe(recipe), tmp_path / f"run{layers}")
        result = subprocess.run([sys.executable, "-c", EXPORT_PEAK, str(tmp_path / f"run{layers}"),
                                 str(tmp_path / f"export{layers}")], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        peaks[layers] = int(result.stdout.strip().splitlines()[-1]) * 1024
    largest = 1024 * 256 * 4
    weights = sum(p.stat().st_size for p in (tmp_path / "vit24").glob("*.safetensors"))
    assert weights > 50 * largest
    assert peaks[24] - peaks[2] < 10 * largest, peaks  # 22 more layers (~70 MB) add almost nothing
