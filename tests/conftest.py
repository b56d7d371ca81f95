"""Shared fixtures: tiny random checkpoints built from transformers configs, the real MiniLM,
and a helper that runs the CLI in-process or as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Tests never touch the network. Set before any test module is collected: huggingface_hub reads these
# once, at its import, and a hub lookup in online mode retries for ~25 s before it fails.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the 2 cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # (the subprocesses it starts inherit it)
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _offline_home(tmp_path_factory):
    """Tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("sve_home")
    os.environ["SVE_HOME"] = str(home)
    yield home


def tiny_llama(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_llama_classifier(num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_vit(num_labels: int = 10):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       image_size=8, patch_size=4, num_channels=1, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


BUILDERS = {"llama": tiny_llama, "llama-cls": tiny_llama_classifier, "bert": tiny_bert, "vit": tiny_vit}


def save_tiny(kind: str, directory: Path, sharded: bool = False) -> Path:
    model = BUILDERS[kind]()
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"llama", "llama-cls", "bert", "vit", "llama-sharded", …}: saved tiny random checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for kind in BUILDERS:
        paths[kind] = save_tiny(kind, root / kind)
        paths[f"{kind}-sharded"] = save_tiny(kind, root / f"{kind}-sharded", sharded=True)
    return paths


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from sve_cli.checkpoint import resolve_model

    return resolve_model("builtin:minilm")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def sve(capsys):
    """Run `sve ARGS…` in this process (fast); returns exit code and captured output."""
    from sve_cli.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()  # what the test's own set-up printed is not the command's output
        argv, sys.argv = sys.argv, ["sve", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv = argv
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def sve_subprocess(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point as a separate process."""
    return subprocess.run([sys.executable, "-m", "sve_cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, **kwargs)


def _copy_tokenizer(source: Path, target: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())


@pytest.fixture(scope="session")
def text_models(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """Tiny random BERT / LLaMA classifiers that carry real tokenizers (MiniLM's, SmolLM2's),
    so recipes run end to end in seconds. Dropout is 0 in `bert-nodrop` (for the DDP test)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from sve_cli.checkpoint import resolve_model

    root = tmp_path_factory.mktemp("text_models")
    torch.manual_seed(0)
    paths = {}
    for name, dropout in (("bert", 0.1), ("bert-nodrop", 0.0)):
        config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        BertForSequenceClassification(config).save_pretrained(root / name)
        _copy_tokenizer(minilm_path, root / name)
        paths[name] = root / name
    smollm2 = resolve_model("builtin:smollm2")
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    _copy_tokenizer(smollm2, root / "llama")
    paths["llama"] = root / "llama"
    return paths


def sentiment_file(directory: Path, count: int = 96) -> Path:
    """A learnable toy sentiment set: label 1 iff the sentence is about something good."""
    import json

    good, bad = ["great", "lovely", "wonderful", "excellent"], ["awful", "terrible", "horrible", "dreadful"]
    rows = []
    for i in range(count):
        label = i % 2
        word = (good if label else bad)[i % 4]
        rows.append({"text": f"the {['film', 'meal', 'trip', 'book'][(i // 2) % 4]} was {word}", "label": label})
    path = directory / "sentiment.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def assert_one_error_line(result: Result, fragment: str = "") -> None:
    """Exit code 2, exactly one non-blank line on stderr, starting 'error: ', no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2, (result.code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr + result.stdout, result.stderr


def write_recipe(path: Path, model: Path, data: Path, **sections: dict) -> Path:
    """A small text-classification recipe; `sections` override keys per section."""
    import yaml

    recipe = {"model": {"path": str(model)},
              "task": {"type": "text_classification", "dataset": str(data), "max_length": 16},
              "ensemble": {"method": "sve", "members": 2},
              "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "seed": 0, "eval_every_steps": 2},
              "eval": {"batch_size": 16}}
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_run(root: Path, name: str, model: Path, data: Path, **sections: dict) -> Path:
    """Train `write_recipe(...)` into `root / name` in this process; returns the run directory."""
    from sve_cli.recipe import load_recipe
    from sve_cli.train import train

    train(load_recipe(write_recipe(root / f"{name}.yaml", model, data, **sections)), root / name)
    return root / name
