"""Training-memory options are exact, and `sve train --dry-run` knows the peak before the run."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sve_cli.recipe import load_recipe
from sve_cli.train import train

from conftest import REPO, assert_one_error_line, sentiment_file, write_recipe


@pytest.fixture(scope="module")
def runs_with_options(text_models, tmp_path_factory):
    """The same 4 steps of SVE (M=3, no dropout, fp32) with every combination of the options."""
    root = tmp_path_factory.mktemp("options")
    data = sentiment_file(root)
    banks, calls = {}, {}
    options = {"plain": {}, "members_per_pass=1": {"members_per_pass": 1}, "members_per_pass=2": {"members_per_pass": 2},
               "gradient_checkpointing": {"gradient_checkpointing": True},
               "both": {"gradient_checkpointing": True, "members_per_pass": 2}}
    for name, extra in options.items():
        recipe = load_recipe(write_recipe(root / f"{name}.yaml", text_models["bert-nodrop"], data, ensemble={"members": 3},
                                          train={"max_steps": 4, "eval_every_steps": 4, **extra}))
        train(recipe, root / name)
        banks[name] = load_file(root / name / "sigma_bank.safetensors")
        calls[name] = json.loads((root / name / "metrics.jsonl").read_text().splitlines()[-1])
    return banks, calls


@pytest.mark.parametrize("option", ["members_per_pass=1", "members_per_pass=2", "gradient_checkpointing", "both"])
def test_memory_options_train_the_same_bank(runs_with_options, option):
    banks, metrics = runs_with_options
    assert banks[option].keys() == banks["plain"].keys()
    for name, tensor in banks["plain"].items():
        torch.testing.assert_close(banks[option][name], tensor, rtol=1e-5, atol=1e-6)
    assert metrics[option]["accuracy"] == metrics["plain"]["accuracy"]
    assert metrics[option]["nll"] == pytest.approx(metrics["plain"]["nll"], rel=1e-5)


def test_gradient_checkpointing_recomputes_the_blocks(text_models, tmp_path):
    """The option really is on: every SVE layer runs twice per step (forward, then recompute)."""
    from sve_cli.pipeline import Pipeline

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text_models["bert-nodrop"], sentiment_file(tmp_path)))
    counts = {}
    for enabled in (False, True):
        model = Pipeline(recipe).build_model(["0", "1"]).train()
        if enabled:
            model.enable_gradient_checkpointing()
        layer = next(iter(model.layers.values()))
        calls = []
        layer.register_forward_hook(lambda *args: calls.append(1))
        ids = torch.randint(1000, 2000, (4, 8))
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).sum().backward()
        counts[enabled] = len(calls)
    assert counts == {False: 1, True: 2}


def test_members_per_pass_predicts_the_same_logits(text_models, tmp_path):
    from sve_cli.data import load_splits
    from sve_cli.pipeline import Pipeline
    from sve_cli.inference import predict

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path),
                                      ensemble={"members": 5}))
    pipeline = Pipeline(recipe)
    splits, names = load_splits(recipe.task, "test")
    model = pipeline.build_model(names)
    encoded = pipeline.encode(splits["validation"])
    whole = predict(model, encoded, 16)
    for per_pass in (1, 2, 3):
        torch.testing.assert_close(predict(model, encoded, 16, members_per_pass=per_pass), whole, rtol=1e-5, atol=1e-6)


# `sve train --dry-run`'s estimate (plan_training) made in a fresh process, then that process trains
PEAK = """
import sys
from pathlib import Path
from sve_cli.memory import plan_training
from sve_cli.recipe import load_recipe
from sve_cli.train import train
recipe = load_recipe(sys.argv[1])
print(plan_training(recipe, "cpu", None).peak_bytes)
train(recipe, Path(sys.argv[2]))
print([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.fixture(scope="module")
def small_models(tmp_path_factory, minilm_path):
    """A 4-block LLaMA and BERT (hidden 256) with real tokenizers: activations are a large share of
    their peak, so the estimate's activation model is what the comparison tests."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from conftest import _copy_tokenizer
    from sve_cli.checkpoint import resolve_model

    root = tmp_path_factory.mktemp("small_models")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                 tie_word_embeddings=True, pad_token_id=2)).save_pretrained(root / "llama")
    _copy_tokenizer(resolve_model("builtin:smollm2"), root / "llama")
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=256, intermediate_size=1024,
                                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256,
                                             num_labels=2)).save_pretrained(root / "bert")
    _copy_tokenizer(minilm_path, root / "bert")
    rows = [{"text": " ".join(["word"] * 200) + f" {i}", "label": i % 2} for i in range(64)]  # every row 128 tokens
    (root / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "bert"])
@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True, "members_per_pass": 1}])
def test_dry_run_estimate_is_within_25_percent_of_the_measured_peak(small_models, tmp_path, model, options):
    recipe = {"model": {"path": str(small_models / model)},
              "task": {"type": "text_classification", "dataset": str(small_models / "long.jsonl"), "max_length": 128,
                       "max_eval_examples": 8},
              "ensemble": {"method": "sve", "members": 4},
              "train": {"max_steps": 2, "batch_size": 16, "eval_every_steps": 2, **options}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tmp_path / "run")], capture_output=True,
                         text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    estimated, measured = int(lines[0]), int(lines[-1]) * 1024
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)


def test_dry_run_says_what_would_make_a_recipe_fit(sve, text_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path),
                          ensemble={"members": 16}, task={"max_length": 64}, train={"batch_size": 64})
    from sve_cli.memory import estimate_memory

    loaded = load_recipe(recipe)
    plain = estimate_memory(loaded, 2, "cpu")
    capacity = int(plain.peak_bytes * 0.8)  # does not fit as it is
    result = sve("train", recipe, "--dry-run", "--device", "cpu", "--memory", str(capacity))
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "fits no:" in text and "to fit --set train." in text
    assert "trainable parameters" in text and "shared factors" in text
    suggestion = text.split("to fit ")[1].split("(")[0].split()
    changes = [suggestion[i + 1] for i in range(0, len(suggestion), 2)]
    assert estimate_memory(load_recipe(recipe, changes), 2, "cpu").peak_bytes <= 0.9 * capacity
    assert not (tmp_path / "runs").exists()


def test_a_plan_that_nothing_fits_says_how_much_it_needs_and_where(sve, text_models, tmp_path):
    """No memory option makes it fit: the plan names the smallest option set, the memory it needs, and (a GPU
    recipe planned on a CPU) that bf16 applies on a GPU only. A recipe meant for a GPU plans for one."""
    recipe = write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path),
                          train={"precision": "bf16"})
    result = sve("train", recipe, "--dry-run", "--device", "cpu", "--memory", "1KB")
    text = " ".join(result.stdout.replace("│", " ").split())
    assert result.code == 0 and "to fit nothing at 0.0 GB;" in text and "needs" in text and "a machine with ≥" in text
    assert "precision bf16 applies on a GPU only" in text
    shipped = " ".join(sve("train", "arc_easy", "--dry-run").stdout.replace("│", " ").split())
    assert "on meta-llama/Llama-2-7b-hf, cuda bf16" in shipped and "fits unknown (no cuda memory to measure" in shipped


def test_a_recipe_meant_for_a_gpu_refuses_to_train_without_one(sve, text_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path), train={"device": "cuda"})
    assert_one_error_line(sve("train", recipe, "--out", tmp_path / "run"), "--set train.device=cpu")
    assert not (tmp_path / "run").exists()


def test_the_papers_llm_recipe_plans_offline(sve):
    """The memory plan the README promises before anything loads: arc_easy.yaml (LLaMA-2-7B, M=16) with no
    network, from the shipped config alone."""
    result = sve("train", "recipes/arc_easy.yaml", "--dry-run", "--device", "cuda", "--memory", "80GB")
    assert result.code == 0, result.stderr
    shown = " ".join(result.stdout.replace("│", " ").split())
    assert "0.223% of the base" in shown and "fits yes: 80.0 GB available" in shown
    assert "LlamaForCausalLM" in shown


def test_per_rank_plans_shard_weights_and_factors_under_fsdp_only():
    """--nproc N: FSDP splits weights, factors and AdamW's state across the ranks (plus the two blocks it
    gathers at a time and the root it keeps whole); DDP replicates them and splits only the batch."""
    from sve_cli.memory import estimate_memory
    from sve_cli.recipe import load_recipe

    plans = {}
    for parallelism in ("ddp", "fsdp"):
        recipe = load_recipe("recipes/arc_easy_70b.yaml", [f"train.parallelism={parallelism}"])
        plans[parallelism] = {n: estimate_memory(recipe, 5, "cuda", 80_000_000_000, n, suggest=False) for n in (1, 4, 8)}
    one, four, eight = (plans["fsdp"][n] for n in (1, 4, 8))
    assert four.factor_bytes == one.factor_bytes // 4 and eight.trainable_bytes == one.trainable_bytes // 8
    assert not one.fits and four.fits and eight.peak_bytes < four.peak_bytes < one.peak_bytes / 3
    ddp = plans["ddp"][4]
    assert ddp.factor_bytes == one.factor_bytes and ddp.activation_bytes < one.activation_bytes and not ddp.fits
    assert four.sharded and not ddp.sharded and four.world == 4
