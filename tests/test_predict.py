"""`sve predict` and selective prediction: the same numbers as `sve evaluate`, thresholds that keep
their promise on validation, every output format, bank-only prediction, bad inputs in one line."""

import json
import math

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from sve_cli.bank import read_bank_metadata

from sve_cli.metrics import combine
from sve_cli.recipe import load_recipe
from sve_cli.train import train

from conftest import assert_one_error_line, sentiment_file, train_run, write_recipe


def _split_file(run, split: str, path, labelled: bool = True):
    """The run's `split` as a jsonl file (text, label), in the split's order."""
    from sve_cli.data import load_splits

    recipe = load_recipe(run / "recipe.yaml")
    splits, names = load_splits(recipe.task, "test")
    examples = splits[getattr(recipe.task, f"{split}_split")]
    rows = [{"text": text, **({"label": names[int(label)]} if labelled else {})}
            for text, label in zip(examples.texts, examples.labels)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, len(rows)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _saved(report):
    """A report's saved raw logits `[N, M, C]` and the temperature the run calibrates them with."""
    with safe_open(str(report / "predictions.safetensors"), "pt") as handle:
        return handle.get_tensor("logits"), json.loads(handle.metadata()["sve.temperature"])


def _probabilities(path):
    return torch.tensor([list(row["probabilities"].values()) for row in _read(path)], dtype=torch.float64)


@pytest.fixture(scope="module")
def run(text_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return train_run(root, "run", text_models["bert"], sentiment_file(root, count=160), ensemble={"members": 3},
                     train={"lr": 5e-2, "max_steps": 6, "eval_every_steps": 6})


def test_predict_equals_evaluates_saved_predictions(sve, run, tmp_path):
    data, count = _split_file(run, "test", tmp_path / "test.jsonl")
    evaluated = sve("evaluate", run, "--data", data, "--save-predictions", "--report", tmp_path / "report")
    assert evaluated.code == 0, evaluated.stderr
    logits, temperature = _saved(tmp_path / "report")
    assert abs(temperature - 1) > 1e-3  # fitted by sve train: calibrated and raw differ
    result = sve("predict", run, "--data", data, "--out", tmp_path / "out.jsonl")
    assert result.code == 0, result.stderr
    assert f"calibrated by the ensemble's temperature {temperature:.4g}" in result.stdout
    rows = _read(tmp_path / "out.jsonl")
    assert [row["id"] for row in rows] == list(range(count))
    torch.testing.assert_close(_probabilities(tmp_path / "out.jsonl"), combine(logits / temperature), rtol=0, atol=1e-6)
    raw = sve("predict", run, "--data", data, "--raw", "--out", tmp_path / "raw.jsonl")
    assert raw.code == 0 and "raw probabilities (--raw)" in raw.stdout
    torch.testing.assert_close(_probabilities(tmp_path / "raw.jsonl"), combine(logits), rtol=0, atol=1e-6)
    members = logits.argmax(-1)  # [N, M]
    assert [row["members"] for row in rows] == [[["0", "1"][m] for m in row] for row in members.tolist()]
    accuracy = sum(row["label"] == row["prediction"] for row in rows) / count
    assert accuracy == pytest.approx(json.loads((tmp_path / "report" / "report.json").read_text())["metrics"]["accuracy"])
    assert "accuracy on the answered labelled rows" in result.stdout


def test_abstention_keeps_the_requested_coverage_on_validation(sve, run, tmp_path):
    assert sve("evaluate", run, "--report", tmp_path / "report").code == 0
    thresholds = json.loads((run / "thresholds.json").read_text())
    assert thresholds["fitted_on"] == "validation" and set(thresholds["scores"]) == {"msp", "entropy", "mutual_information"}
    data, count = _split_file(run, "validation", tmp_path / "validation.jsonl")
    for score in ("entropy", "msp", "mutual_information"):
        for coverage in (0.5, 0.8, 0.9):
            out = tmp_path / f"{score}-{coverage}.jsonl"
            result = sve("predict", run, "--data", data, "--out", out, "--score", score,
                         "--abstain-coverage", str(coverage))
            assert result.code == 0, result.stderr
            assert f"the {100 * coverage:g}% coverage threshold" in result.stdout
            answered = sum(not row["abstain"] for row in _read(out))
            assert abs(answered - math.ceil(coverage * count)) <= 1, (score, coverage, answered, count)


def test_unlabelled_input_and_every_format(sve, run, tmp_path):
    data, count = _split_file(run, "test", tmp_path / "plain.jsonl", labelled=False)
    outputs = {}
    for suffix in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"out.{suffix}"
        result = sve("predict", run, "--data", data, "--out", out, "--abstain-threshold", "0.5")
        assert result.code == 0, result.stderr
        outputs[suffix] = pd.read_json(out, lines=True) if suffix == "jsonl" else getattr(pd, f"read_{suffix}")(out)
        assert len(outputs[suffix]) == count and "label" not in outputs[suffix].columns
    assert outputs["csv"]["p_0"].tolist() == pytest.approx([p["0"] for p in outputs["jsonl"]["probabilities"]], abs=1e-9)
    assert outputs["parquet"]["abstain"].tolist() == outputs["jsonl"]["abstain"].tolist()
    assert outputs["parquet"]["entropy"].tolist() == pytest.approx(outputs["jsonl"]["entropy"].tolist(), abs=1e-12)
    assert (outputs["jsonl"]["abstain"] == (outputs["jsonl"]["entropy"] > 0.5)).all()


def test_a_bank_file_alone_predicts_like_its_run(sve, run, tmp_path):
    assert sve("evaluate", run, "--report", tmp_path / "report").code == 0
    bank = tmp_path / "bank.safetensors"
    assert sve("export", run, "--format", "sigma-bank", "--out", bank).code == 0
    data, _ = _split_file(run, "test", tmp_path / "test.jsonl")
    options = ["--data", data, "--abstain-coverage", "0.8"]
    assert sve("predict", run, *options, "--out", tmp_path / "run.jsonl").code == 0
    assert sve("predict", bank, *options, "--out", tmp_path / "bank.jsonl").code == 0
    assert _read(tmp_path / "run.jsonl") == _read(tmp_path / "bank.jsonl")


def test_one_member_alone(sve, run, tmp_path):
    data, _ = _split_file(run, "test", tmp_path / "test.jsonl")
    assert sve("evaluate", run, "--data", data, "--save-predictions", "--report", tmp_path / "report").code == 0
    logits, _ = _saved(tmp_path / "report")
    member_temperature = read_bank_metadata(run / "sigma_bank.safetensors")["calibration"]["member_temperatures"][2]
    result = sve("predict", run, "--data", data, "--member", "2", "--out", tmp_path / "m2.jsonl")
    assert result.code == 0 and f"member 2's temperature {member_temperature:.4g}" in result.stdout
    rows = _read(tmp_path / "m2.jsonl")
    assert all(len(row["members"]) == 1 and row["mutual_information"] is None for row in rows)
    expected = (logits[:, 2].double() / member_temperature).softmax(-1)  # the member's own temperature
    torch.testing.assert_close(_probabilities(tmp_path / "m2.jsonl"), expected, rtol=0, atol=1e-6)


def test_thresholds_fitted_on_calibrated_scores_refuse_raw(sve, run, tmp_path):
    assert sve("evaluate", run, "--report", tmp_path / "report").code == 0
    data, _ = _split_file(run, "test", tmp_path / "test.jsonl")
    for option in (["--abstain-coverage", "0.9"], ["--conformal", "0.9"]):
        assert_one_error_line(sve("predict", run, "--data", data, "--raw", *option, "--out", tmp_path / "o.jsonl"),
                              "drop --raw")


@pytest.mark.parametrize("make_args,fragment", [
    (lambda run, tmp: [run, "--data", tmp / "missing.jsonl"], "does not exist"),
    (lambda run, tmp: [run, "--data", _write(tmp / "empty.jsonl", "")], "no rows"),
    (lambda run, tmp: [run, "--data", _write(tmp / "other.jsonl", '{"words": "hi"}\n')], "no column 'text'"),
    (lambda run, tmp: [run, "--data", _write(tmp / "bad.jsonl", '{"text": "hi", "label": "joy"}\n')],
     "label 'joy' not among the run's labels"),
    (lambda run, tmp: [run, "--data", _text(tmp), "--out", tmp / "out.txt"], "use a .jsonl, .csv or .parquet file"),
    (lambda run, tmp: [run, "--data", _text(tmp), "--out", _write(tmp / "taken.jsonl", "x")],
     "exists and is not an sve predictions file"),
    (lambda run, tmp: [run, "--data", _text(tmp), "--member", "7"], "out of range"),
    (lambda run, tmp: [run, "--data", _text(tmp), "--member", "1", "--score", "mutual_information"],
     "needs the whole ensemble"),
    (lambda run, tmp: [run, "--data", _text(tmp), "--abstain-coverage", "0.9", "--abstain-threshold", "1"],
     "at most one of"),
    (lambda run, tmp: [tmp, "--data", _text(tmp)], "not a run directory"),
    (lambda run, tmp: [_write(tmp / "x.safetensors", "junk"), "--data", _text(tmp)], "not a readable Σ bank"),
])
def test_bad_inputs_are_one_line(sve, run, tmp_path, make_args, fragment):
    result = sve("predict", *make_args(run, tmp_path))
    assert_one_error_line(result, fragment)


def test_coverage_without_fitted_thresholds_is_refused(sve, text_models, tmp_path):
    fresh = train_run(tmp_path, "fresh", text_models["bert"], sentiment_file(tmp_path))
    result = sve("predict", fresh, "--data", _text(tmp_path), "--abstain-coverage", "0.9")
    assert_one_error_line(result, "run `sve evaluate` on the run first")
    assert sve("evaluate", fresh).code == 0
    (fresh / "sigma_bank.safetensors").write_bytes((fresh / "sigma_bank.safetensors").read_bytes() + b"")
    assert sve("predict", fresh, "--data", _text(tmp_path), "--abstain-coverage", "0.9").code == 0
    bank = load_file(fresh / "sigma_bank.safetensors")
    from sve_cli.bank import read_bank_metadata
    from sve_cli.writing import save_safetensors

    metadata = {f"sve.{k}": json.dumps(v) for k, v in read_bank_metadata(fresh / "sigma_bank.safetensors").items()}
    bank["head.bias"] = bank["head.bias"] + 1  # another bank: the thresholds no longer belong to it
    save_safetensors(fresh / "sigma_bank.safetensors", bank, metadata)
    result = sve("predict", fresh, "--data", _text(tmp_path), "--abstain-coverage", "0.9", "--overwrite")
    assert_one_error_line(result, "was fitted for another bank")


def _write(path, text):
    path.write_text(text)
    return path


def _text(tmp):
    return _write(tmp / "texts.jsonl", '{"text": "the film was great"}\n{"text": "the meal was awful"}\n')


def test_multiple_choice_run_predicts_letters(sve, text_models, tmp_path):
    rows = [{"question": f"Which word is a colour? ({i})", "choices": {"text": ["red", "run", "rock"], "label": ["A", "B", "C"]},
             "answerKey": "ABC"[i % 3]} for i in range(24)]
    data = _write(tmp_path / "arc.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run = train_run(tmp_path, "mc", text_models["llama"], data, task={"type": "multiple_choice", "max_length": 48},
                    ensemble={"members": 2, "bias": False})
    assert sve("evaluate", run, "--data", data, "--save-predictions", "--report", tmp_path / "report").code == 0
    assert sve("predict", run, "--data", data, "--out", tmp_path / "out.jsonl").code == 0
    logits, temperature = _saved(tmp_path / "report")
    torch.testing.assert_close(_probabilities(tmp_path / "out.jsonl"), combine(logits / temperature), rtol=0, atol=1e-6)
    assert {row["prediction"] for row in _read(tmp_path / "out.jsonl")} <= {"A", "B", "C"}


@pytest.mark.slow
def test_real_minilm_predict_equals_evaluate(sve, tmp_path):
    recipe = {"model": {"path": "builtin:minilm"},
              "task": {"type": "text_classification", "dataset": "builtin:tweets", "max_length": 32,
                       "max_train_examples": 64, "max_eval_examples": 48},
              "ensemble": {"method": "sve", "members": 2}, "train": {"max_steps": 2, "batch_size": 16}}
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path), tmp_path / "run")
    data, _ = _split_file(tmp_path / "run", "test", tmp_path / "test.jsonl")
    assert sve("evaluate", tmp_path / "run", "--data", data, "--save-predictions", "--report", tmp_path / "r").code == 0
    assert sve("predict", tmp_path / "run", "--data", data, "--out", tmp_path / "out.jsonl").code == 0
    logits, temperature = _saved(tmp_path / "r")
    torch.testing.assert_close(_probabilities(tmp_path / "out.jsonl"), combine(logits / temperature), rtol=0, atol=1e-6)


def test_inputs_longer_than_the_model_reads_are_cut_and_a_max_length_without_room_is_refused(sve, text_models, tmp_path):
    # the tiny BERT has 64 positions; max_length 500 is clamped to them (said once) instead of crashing
    run = train_run(tmp_path, "long", text_models["bert"], sentiment_file(tmp_path), task={"max_length": 500},
                    train={"max_steps": 2, "eval_every_steps": 2})
    data = _write(tmp_path / "long.jsonl", json.dumps({"text": "the film was great " * 2500}) + "\n")
    result = sve("predict", run, "--data", data, "--out", tmp_path / "out.jsonl")
    assert result.code == 0, result.stderr
    assert len(_read(tmp_path / "out.jsonl")) == 1
    recipe = write_recipe(tmp_path / "short.yaml", text_models["bert"], sentiment_file(tmp_path), task={"max_length": 2})
    assert_one_error_line(sve("train", recipe, "--out", tmp_path / "short"),
                          "task.max_length 2 leaves no room for text: this tokenizer adds 2 special token(s)")
    assert not (tmp_path / "short").exists()
