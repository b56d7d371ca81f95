"""Faults at scale: SIGKILL at random moments, restart, same result; readers never see a partial
file. And memory: decompose's peak RSS follows the largest tensor, not the checkpoint."""

import json
import os
import random
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

from conftest import REPO, sentiment_file, sve_subprocess

KILLS = int(os.environ.get("SVE_KILLS", "20"))


def _assert_no_partial_files(directory: Path) -> None:
    """Every visible file is whole: safetensors parse and read, JSON parses."""
    for path in directory.iterdir():
        if ".tmp-" in path.name:
            continue  # temporaries are never read by sve
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_tensor(name)
        elif path.suffix in (".json", ".jsonl"):
            for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
                json.loads(line)


def _kill_repeatedly(command_for, directory: Path, seed: int) -> int:
    """Start, SIGKILL after a random delay, check the files, restart — KILLS times."""
    rng = random.Random(seed)
    completed = 0
    for _ in range(KILLS):
        process = subprocess.Popen(command_for(directory), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 5.0))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        elif process.returncode == 0:
            completed += 1
        process.wait()
        if directory.exists():
            _assert_no_partial_files(directory)
    return completed


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if ".tmp-" not in p.name}


@pytest.mark.slow
def test_decompose_survives_random_sigkills(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(384, 384, generator=generator)
               for i in range(24)}, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text('{"model_type": "llama"}')
    options = ["--targets", "*.q_proj.weight", "--max-shard-size", "2MB"]
    assert sve_subprocess("decompose", model, "--out", tmp_path / "reference", *options).returncode == 0

    def command(out):
        return [sys.executable, "-m", "sve_cli", "decompose", str(model), "--out", str(out), *options]

    _kill_repeatedly(command, tmp_path / "killed", seed=1)
    final = sve_subprocess("decompose", model, "--out", tmp_path / "killed", *options)
    assert final.returncode == 0, final.stderr
    assert _files(tmp_path / "killed") == _files(tmp_path / "reference")


@pytest.mark.slow
def test_train_survives_random_sigkills(text_models, tmp_path):
    recipe = {"model": {"path": str(text_models["bert"])},
              "task": {"type": "text_classification", "dataset": str(sentiment_file(tmp_path)), "max_length": 16},
              "ensemble": {"method": "sve", "members": 2},
              "train": {"max_steps": 60, "batch_size": 8, "lr": 1e-2, "eval_every_steps": 20, "checkpoint_every_steps": 3}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert sve_subprocess("train", path, "--out", tmp_path / "reference").returncode == 0

    def command(out):
        flag = "--resume" if (out / "checkpoint.safetensors").exists() else "--overwrite"
        return [sys.executable, "-m", "sve_cli", "train", str(path), "--out", str(out), flag]

    _kill_repeatedly(command, tmp_path / "killed", seed=2)
    final = sve_subprocess(*command(tmp_path / "killed")[3:])
    assert final.returncode == 0, final.stderr
    reference, killed = _files(tmp_path / "reference"), _files(tmp_path / "killed")
    for name in ("sigma_bank.safetensors", "metrics.jsonl", "recipe.yaml"):
        assert killed[name] == reference[name], name


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
    for count in (1, 10, 80):  # checkpoints of 1, 10 and 80 targets of 1024×1024 float32 (4 MB each)
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
    # targets; 70 more (280 MB of checkpoint, 560 MB of factors) must not add to it. The slack of
    # five tensors covers allocator arenas: a loaded run once measured +16 MB from 10 to 80.
    assert peaks[80] - peaks[10] < 5 * largest, peaks
    assert peaks[80] - peaks[1] < 20 * largest, peaks


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
