"""Training: every method on tiny models, resume after SIGKILL, torchrun, a real MiniLM run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sve_cli.bank import read_bank_metadata
from sve_cli.recipe import load_recipe
from sve_cli.schedule import lr_factor
from sve_cli.train import train

from conftest import REPO, assert_one_error_line, sentiment_file, write_recipe


@pytest.mark.parametrize("ensemble", [
    {"method": "sve", "members": 3},
    {"method": "svf", "members": 1},
    {"method": "single", "members": 1, "single_mode": "full"},
    {"method": "single", "members": 1, "single_mode": "head"},
    {"method": "deep_ensemble", "members": 2},
    {"method": "lora_ensemble", "members": 2, "lora_rank": 2},
])
def test_every_method_trains_and_its_bank_reloads(text_models, tmp_path, ensemble):
    from sve_cli.bank import load_bank
    from sve_cli.data import load_splits
    from sve_cli.pipeline import Pipeline

    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", text_models["bert"], sentiment_file(tmp_path), ensemble=ensemble))
    out = tmp_path / "run"
    state = train(recipe, out)
    assert state["step"] == 4 and state["finished"] and len(state["history"]) == 2
    assert {p.name for p in out.iterdir()} == {"recipe.yaml", "sigma_bank.safetensors", "checkpoint.safetensors",
                                              "trainer_state.json", "metrics.jsonl", ".sve.lock"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4] and len(lines[0]["member_accuracy"]) == ensemble["members"]
    # the best bank reloads into a fresh model and reproduces the logged validation accuracy
    pipeline = Pipeline(recipe)
    splits, names = load_splits(recipe.task, "test")
    model = pipeline.build_model(names)
    metadata = load_bank(model, out / "sigma_bank.safetensors")
    assert metadata["method"] == ensemble["method"] and metadata["label_names"] == ["0", "1"]
    from sve_cli.inference import predict
    from sve_cli.metrics import Prediction, calibration_metrics

    logits = predict(model, pipeline.encode(splits["validation"]), 16)
    best = next(line for line in lines if line["step"] == state["best_step"])
    assert calibration_metrics(Prediction.of(logits), splits["validation"].labels)["accuracy"] == pytest.approx(best["accuracy"])


def test_frozen_parts_and_trainable_counts_per_method(text_models, tmp_path):
    from sve_cli.pipeline import Pipeline

    data = sentiment_file(tmp_path)
    counts = {}
    for ensemble in ({"method": "sve", "members": 4}, {"method": "deep_ensemble", "members": 4},
                     {"method": "lora_ensemble", "members": 4, "lora_rank": 2}):
        recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", text_models["bert"], data, ensemble=ensemble))
        model = Pipeline(recipe).build_model(["0", "1"])
        counts[ensemble["method"]] = sum(p.numel() for p in model.trainable_parameters().values())
    # 12 targets of 32 or 48 outputs: SVE owns k + out per target and member; dense copies own out·in
    assert counts["sve"] < counts["lora_ensemble"] < counts["deep_ensemble"]


def test_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0


def test_multiple_choice_on_a_causal_lm(text_models, tmp_path):
    rows = [{"question": f"Which word is a colour? ({i})", "choices": {"text": ["red", "run", "rock"], "label": ["A", "B", "C"]},
             "answerKey": "A"} for i in range(24)]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", text_models["llama"], data,
                                 task={"type": "multiple_choice", "max_length": 48},
                                 ensemble={"method": "sve", "members": 2, "bias": False}))
    state = train(recipe, tmp_path / "run")
    assert state["label_names"] == ["A", "B", "C"] and state["finished"]


def test_image_classification_on_the_random_vit(tmp_path):
    recipe = {"model": {"path": "builtin:vit-tiny"},
              "task": {"type": "image_classification", "dataset": "builtin:digits", "max_train_examples": 64,
                       "max_eval_examples": 32},
              "ensemble": {"method": "sve", "members": 2}, "train": {"max_steps": 2, "batch_size": 16}}
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(recipe))
    state = train(load_recipe(path), tmp_path / "run")
    assert state["history"][-1]["split"] == "validation" and len(state["label_names"]) == 10


def _bank(out: Path) -> dict:
    return load_file(out / "sigma_bank.safetensors")


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(text_models, tmp_path):
    """`sve train --nproc 2` (torchrun's agent; tests/test_distributed.py starts plain torchrun). Both runs take the same code path (factored, one thread each); the DDP ranks start on a cold
    decomposition cache, which one of them makes while the other waits for it (a lock)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", text_models["bert-nodrop"], sentiment_file(tmp_path),
                          ensemble={"strategy": "factored"}, train={"max_steps": 3, "eval_every_steps": 3, "batch_size": 8})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SVE_HOME": str(tmp_path / "home-single")}
    single = subprocess.run([sys.executable, "-m", "sve_cli", "train", str(recipe), "--out", str(tmp_path / "single")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    cold = tmp_path / "home-ddp"
    ddp = subprocess.run([sys.executable, "-m", "sve_cli", "train", str(recipe), "--nproc", "2",
                          "--out", str(tmp_path / "ddp")],
                         cwd=REPO, capture_output=True, text=True, env={**env, "SVE_HOME": str(cold)})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    caches = list((cold / "decompositions").iterdir())
    assert len(caches) == 1 and (caches[0] / "decomposition.json").exists()
    assert not [p for p in caches[0].iterdir() if ".tmp-" in p.name]
    expected, actual = _bank(tmp_path / "single"), _bank(tmp_path / "ddp")
    assert expected.keys() == actual.keys()
    # The same maths, in another order of float sums. Adam divides by sqrt(v): where a gradient is
    # ~0 its rounding can flip the sign of a whole step (lr = 1e-2), so a few isolated values may
    # differ by up to 2 steps; everything else must agree tightly.
    differences = torch.cat([(actual[name] - expected[name]).abs().flatten() for name in expected])
    scale = torch.cat([expected[name].abs().flatten() for name in expected])
    close = differences <= 1e-5 + 1e-4 * scale
    assert close.float().mean() >= 0.99, f"{int((~close).sum())} of {close.numel()} values differ"
    assert differences.max() <= 2 * 3 * 1e-2
    single_metrics = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ddp_metrics["accuracy"] == single_metrics["accuracy"]
    assert ddp_metrics["nll"] == pytest.approx(single_metrics["nll"], rel=1e-4)


@pytest.mark.slow
def test_real_minilm_on_tweets_loss_goes_down(tmp_path):
    path = REPO / "recipes" / "quickstart.yaml"
    recipe = load_recipe(path, ["task.max_train_examples=480", "task.max_eval_examples=64", "train.max_steps=30",
                                "train.batch_size=16", "task.max_length=32", "train.eval_every_steps=30",
                                "ensemble.members=2", "train.lr=3e-3"])
    losses = []
    state = train(recipe, tmp_path / "run", on_step=lambda info: losses.append(info["loss"]))
    assert len(losses) == 30 and state["finished"]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.02


def test_cli_errors_are_one_line(sve, text_models, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\ntask:\n  type: regression\n  dataset: y\n")
    assert_one_error_line(sve("train", bad, "--out", tmp_path / "run"), "task.type")
    recipe = write_recipe(tmp_path / "recipe.yaml", text_models["bert"], sentiment_file(tmp_path))
    result = sve("train", recipe, "--out", tmp_path / "fresh", "--resume")
    assert_one_error_line(result, "holds no run to resume")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = sve("train", recipe, "--out", tmp_path / "taken", *extra)
        assert_one_error_line(result, "holds files that are not an sve run; sve never writes there")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_learning_rate_groups(text_models, tmp_path):
    from sve_cli.pipeline import Pipeline
    from sve_cli.schedule import param_groups

    path = write_recipe(tmp_path / "recipe.yaml", text_models["bert"], sentiment_file(tmp_path), ensemble={"method": "sve", "members": 2},
                   train={"lr": 1e-3, "sigma_lr": 2e-3, "head_lr": 3e-3, "sigma_weight_decay": 0.0})
    recipe = load_recipe(path)
    model = Pipeline(recipe).build_model(["0", "1"])
    groups = {g["lr"]: g for g in param_groups(model, recipe)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups[2e-3]["params"]} == {"sigma"} and groups[2e-3]["weight_decay"] == 0.0
    assert {names[id(p)] for p in groups[3e-3]["params"]} == {"head.weight", "head.bias"}
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups[1e-3]["params"]} == {"bias"}
    assert sum(len(g["params"]) for g in groups.values()) == len(model.trainable_parameters())


def test_tensorboard_log_of_loss_lr_and_validation(text_models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", text_models["bert"], sentiment_file(tmp_path),
                                      train={"log_tensorboard": True, "sigma_lr": 2e-2}))
    state = train(recipe, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/member_accuracy", "lr/sigma", "lr/heads", "lr/other",
            "validation/accuracy", "validation/nll", "validation/ece"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("validation/nll")] == pytest.approx([h["nll"] for h in state["history"]])
    assert events.Scalars("lr/sigma")[-1].value == pytest.approx(2e-2 * lr_factor(3, 4, 0, "cosine"))


def test_a_users_split_files_train_as_named_and_a_wrong_split_fails_before_loading(sve, text_models, tmp_path):
    rows = [json.loads(line) for line in sentiment_file(tmp_path).read_text().splitlines()]
    for split, (start, stop) in {"train": (0, 64), "validation": (64, 84), "test": (84, 96)}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[start:stop]))
    files = {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")}
    recipe = write_recipe(tmp_path / "recipe.yaml", text_models["bert"], tmp_path / "train.jsonl",
                          task={"dataset": files}, train={"max_steps": 2, "eval_every_steps": 2})
    plan = sve("train", recipe, "--dry-run", "--device", "cpu")
    assert plan.code == 0, plan.stderr
    line = f"data: train 64 rows from {files['train']}; validation 20 rows from {files['validation']}; test 12 rows"
    shown = " ".join(plan.stdout.split())
    assert line in shown and "classes in train: 0 32, 1 32" in shown and "classes in validation: 0 10, 1 10" in shown
    assert "steps: 2 (8 per epoch of 64 rows, batch 8 × 2 member(s))" in shown
    assert "max_length 16: 0.0% of training inputs are longer" in shown
    cut = sve("train", recipe, "--dry-run", "--device", "cpu", "--set", "task.max_length=4")  # [CLS] + 4 words + [SEP]
    assert "max_length 4: 100.0% of training inputs are longer and cut from the right" in " ".join(cut.stdout.split())
    result = sve("train", recipe, "--out", tmp_path / "run")
    assert result.code == 0, result.stderr
    assert line in " ".join(result.stdout.split())
    # stdout is not a terminal: plain progress lines (the first step and the last), as `> train.log` gets them
    assert [row.split(" loss ")[0] for row in result.stdout.splitlines() if row.startswith("step ")
            and " s/step " in row] == ["step 1/2", "step 2/2"]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["history"][-1]["split"] == "validation"
    assert read_bank_metadata(tmp_path / "run" / "sigma_bank.safetensors")["calibration"]["examples"] == 20
    result = sve("train", recipe, "--out", tmp_path / "wrong", "--set", f"task.test_split={files['test']}")
    assert_one_error_line(result, "task.test_split: '" + files["test"] + "' looks like a file, but a split is a name")
    assert not (tmp_path / "wrong").exists()


def test_lr_auto_chooses_by_short_runs_equal_to_plain_runs_and_a_resume_does_not_sweep_again(sve, text_models, tmp_path):
    """Each sweep trial is exactly a plain run of that lr stopped at the sweep's steps (same seed, its own short
    schedule); the auto run then is exactly a plain run at the chosen lr."""
    data = sentiment_file(tmp_path)
    common = {"ensemble": {"members": 2}, "train": {"max_steps": 4, "eval_every_steps": 2}}
    auto = write_recipe(tmp_path / "auto.yaml", text_models["bert"], data, **{
        **common, "train": {**common["train"], "lr": "auto", "lr_grid": [1e-3, 3e-2], "lr_sweep_steps": 2}})
    result = sve("train", auto, "--out", tmp_path / "auto")
    assert result.code == 0, result.stderr
    sweep = json.loads((tmp_path / "auto" / "lr_sweep.json").read_text())
    assert sweep["steps"] == 2 and [trial["lr"] for trial in sweep["trials"]] == [1e-3, 3e-2]
    assert "lr auto: 2 rates × 2 steps" in result.stdout + result.stderr
    for trial in sweep["trials"]:
        plain = tmp_path / f"plain-{trial['lr']:g}"
        train(load_recipe(write_recipe(tmp_path / f"{plain.name}.yaml", text_models["bert"], data, **{
            **common, "train": {"max_steps": 2, "eval_every_steps": 2, "lr": trial["lr"]}})), plain)
        final = json.loads((plain / "metrics.jsonl").read_text().splitlines()[-1])
        assert (trial["accuracy"], trial["nll"]) == (final["accuracy"], final["nll"])
    best = max(sweep["trials"], key=lambda t: (t["accuracy"], -t["nll"]))
    assert sweep["chosen"] == best["lr"]
    chosen = tmp_path / "chosen"
    train(load_recipe(write_recipe(tmp_path / "chosen.yaml", text_models["bert"], data, **{
        **common, "train": {**common["train"], "lr": best["lr"]}})), chosen)
    expected, actual = load_file(chosen / "sigma_bank.safetensors"), load_file(tmp_path / "auto" / "sigma_bank.safetensors")
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    assert yaml.safe_load((tmp_path / "auto" / "recipe.yaml").read_text())["train"]["lr"] == "auto"
    resumed = sve("train", auto, "--out", tmp_path / "auto", "--resume")
    assert resumed.code == 0 and f"lr auto: {best['lr']:g}, as the sweep in" in resumed.stdout + resumed.stderr


def test_lr_auto_says_when_no_rate_beats_a_uniform_guess(sve, text_models, tmp_path):
    """A sweep too short (or, here, a validation split that contradicts training) to learn anything a uniform
    guess does not already know chooses by noise: sve says so, with the numbers, and records the guess's NLL."""
    rows = [json.loads(line) for line in sentiment_file(tmp_path).read_text().splitlines()]
    paths = {}
    for split, part in (("train", rows[:64]), ("validation", rows[64:80]), ("test", rows[80:])):
        flipped = split != "train"  # every held-out label the opposite of what training teaches
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({**row, "label": 1 - row["label"] if flipped else row["label"]}) + "\n"
                                        for row in part))
    recipe = write_recipe(tmp_path / "auto.yaml", text_models["bert"], paths["train"],
                          task={"dataset": {split: str(path) for split, path in paths.items()}},
                          ensemble={"members": 2}, train={"lr": "auto", "lr_grid": [0.5], "lr_sweep_steps": 3})
    result = sve("train", recipe, "--out", tmp_path / "auto")
    assert result.code == 0, result.stderr
    sweep = json.loads((tmp_path / "auto" / "lr_sweep.json").read_text())
    assert sweep["uniform_nll"] == pytest.approx(0.6931471805599453) and sweep["trials"][0]["nll"] > sweep["uniform_nll"]
    assert (f"lr auto: no rate predicts validation better than a uniform guess after 3 steps (best NLL "
            f"{sweep['trials'][0]['nll']:.3f} ≥ 0.693), so the choice is noise: raise train.lr_sweep_steps or set "
            f"train.lr") in " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize("setting, fragment", [("train.lr=0", "train.lr: a learning rate must be greater than 0"), ("train.lr=fast", "train.lr"),
                                               ("train.lr_grid=[]", "train.lr_grid"),
                                               ("train.lr_grid=[1e-2, -1]", "train.lr_grid")])
def test_lr_settings_are_checked(text_models, tmp_path, setting, fragment):
    from sve_cli.errors import RecipeError

    path = write_recipe(tmp_path / "r.yaml", text_models["bert"], sentiment_file(tmp_path))
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(path, [setting])
