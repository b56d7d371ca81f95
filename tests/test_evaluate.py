"""`sve evaluate`: report numbers, files, several runs, and bad input."""

import json

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sve_cli import metrics
from sve_cli.bank import read_bank_metadata

from conftest import assert_one_error_line, sentiment_file, train_run


@pytest.fixture(scope="module")
def runs(text_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    data = sentiment_file(root, count=120)
    sections = {"train": {"max_steps": 6, "eval_every_steps": 3}}
    return {"sve": train_run(root, "sve", text_models["bert"], data, ensemble={"members": 3}, **sections),
            "svf": train_run(root, "svf", text_models["bert"], data, ensemble={"method": "svf", "members": 1}, **sections),
            "raw": train_run(root, "raw", text_models["bert"], data, ensemble={"members": 2}, eval={"calibration": "none"},
                             **sections),
            "root": root}


def test_report_numbers_equal_those_recomputed_from_predictions(sve, runs, tmp_path):
    result = sve("evaluate", runs["sve"], "--ood", "tweets", "--max-examples", "40", "--save-predictions",
                 "--temperature", "--report", tmp_path / "report")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    saved = load_file(tmp_path / "report" / "predictions.safetensors")
    logits, labels = saved["logits"], saved["labels"]
    assert logits.shape == (12, 3, 2) and report["data"]["sizes"]["in_distribution"] == 12
    with safe_open(str(tmp_path / "report" / "predictions.safetensors"), "pt") as handle:
        temperature = json.loads(handle.metadata()["sve.temperature"])
    # --temperature refits on validation: the same temperature as fitting the saved validation logits here
    assert temperature == pytest.approx(metrics.fit_temperature(saved["validation.logits"], saved["validation.labels"]),
                                        rel=1e-6)
    assert report["calibration"]["method"] == "temperature" and report["calibration"]["temperature"] == temperature
    assert abs(temperature - 1) > 1e-3  # so calibrated and raw numbers really differ below
    raw = metrics.calibration_metrics(metrics.Prediction.of(logits), labels)
    calibrated = metrics.calibration_metrics(metrics.Prediction.of(logits / temperature), labels)
    for key in ("accuracy", "nll", "brier", "ece", "adaptive_ece", "mce", "disagreement"):
        assert report["metrics"][key] == pytest.approx(calibrated[key], abs=1e-6), key
        assert report["raw_metrics"][key] == pytest.approx(raw[key], abs=1e-6), key
    ood = metrics.ood_metrics(metrics.Prediction.of(logits / temperature),
                              metrics.Prediction.of(saved["ood.tweets.logits"] / temperature))
    assert saved["ood.tweets.logits"].shape == (40, 3, 2)
    for score in ("msp", "entropy", "mutual_information"):
        assert report["ood"]["tweets"][score]["auroc"] == pytest.approx(ood[score]["auroc"], abs=1e-6)
    assert "(lo, hi]" in report["conventions"]["ece"] and report["conventions"]["bins"] == 15
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (f"| NLL | {report['metrics']['nll']:.4f} | {report['raw_metrics']['nll']:.4f} |" in markdown
            and "OOD set `tweets`" in markdown)
    for png, size in (("reliability.png", (500, 600)), ("ood_tweets.png", (1200, 320))):
        with Image.open(tmp_path / "report" / png) as image:
            assert image.format == "PNG" and image.size == size
            darkest, brightest = image.convert("L").getextrema()
            assert brightest - darkest > 100  # something is drawn


def test_the_temperature_fitted_by_train_is_used_and_none_means_raw(sve, runs, tmp_path):
    result = sve("evaluate", runs["sve"], runs["raw"], "--save-predictions", "--report", tmp_path)
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "sve" / "report.json").read_text())
    bank = read_bank_metadata(runs["sve"] / "sigma_bank.safetensors")["calibration"]
    saved = load_file(tmp_path / "sve" / "predictions.safetensors")
    # train fitted it on the validation logits of the bank it kept: the logits evaluate saw again
    refit = metrics.fit_calibration(saved["validation.logits"], saved["validation.labels"])
    assert bank["temperature"] == pytest.approx(refit["temperature"], rel=1e-5)
    assert bank["member_temperatures"] == pytest.approx(refit["member_temperatures"], rel=1e-5)
    assert report["calibration"]["temperature"] == bank["temperature"] and "sve train" in report["calibration"]["source"]
    calibrated = metrics.calibration_metrics(metrics.Prediction.of(saved["logits"] / bank["temperature"]), saved["labels"])
    assert report["metrics"]["nll"] == pytest.approx(calibrated["nll"], abs=1e-6)
    assert report["metrics"]["nll"] != pytest.approx(report["raw_metrics"]["nll"], abs=1e-6)
    raw = json.loads((tmp_path / "raw" / "report.json").read_text())
    assert raw["calibration"]["method"] == "none" and raw["metrics"] == raw["raw_metrics"]
    assert "temperature" in result.stdout and "none (raw)" in result.stdout
    fitted = json.loads((runs["sve"] / "thresholds.json").read_text())
    assert fitted["temperature"] == bank["temperature"]  # thresholds are fitted on the calibrated scores


def test_several_runs_side_by_side_and_mi_only_for_ensembles(sve, runs, tmp_path):
    result = sve("evaluate", runs["sve"], runs["svf"], "--ood", "tweets", "--max-examples", "20", "--report", tmp_path)
    assert result.code == 0, result.stderr
    assert "sve M=3" in result.stdout and "svf M=1" in result.stdout
    single = json.loads((tmp_path / "svf" / "report.json").read_text())
    assert "mutual_information" not in single["ood"]["tweets"]
    assert "needs an ensemble" in (tmp_path / "svf" / "report.md").read_text()
    assert (tmp_path / "sve" / "report.json").exists()


def test_local_data_file_as_in_distribution(sve, runs, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "the film was great", "label": "1"}\n{"text": "the meal was awful", "label": 0}\n')
    result = sve("evaluate", runs["sve"], "--data", data, "--report", tmp_path / "r")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["data"]["sizes"]["in_distribution"] == 2


@pytest.mark.parametrize("make_args,fragment", [
    (lambda runs, tmp: [runs["sve"], "--ood", "imagenet-o"], "unknown OOD set 'imagenet-o'"),
    (lambda runs, tmp: [runs["sve"], "--ood", "digits"], "OOD set 'digits' holds images, but this run classifies text"),
    (lambda runs, tmp: [tmp], "is not a run directory"),
    (lambda runs, tmp: [_bankless(runs, tmp)], "has no sigma_bank.safetensors"),
    (lambda runs, tmp: [runs["sve"], "--data", _empty(tmp)], "holds no rows"),
    (lambda runs, tmp: [runs["sve"], "--ood", "svhn"], "OOD set 'svhn' holds images, but this run classifies text"),
    (lambda runs, tmp: [runs["sve"], "--ood", "imdb"], "cannot be loaded from the Hugging Face Hub: offline mode"),
])
def test_bad_input_is_one_line(sve, runs, tmp_path, make_args, fragment):
    assert_one_error_line(sve("evaluate", *make_args(runs, tmp_path)), fragment)


def test_an_ood_file_is_named_as_given(sve, runs, tmp_path):
    data = tmp_path / "ood.jsonl"
    data.write_text("".join(f'{{"text": "an unrelated sentence number {i}"}}\n' for i in range(6)))
    result = sve("evaluate", runs["sve"], "--ood", f"forum-posts={data}", "--ood", str(data), "--report", tmp_path / "r")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["ood"]) == ["forum-posts", "ood"] and report["data"]["ood_sources"]["forum-posts"] == f"forum-posts={data}"
    assert "OOD forum-posts AUROC" in " ".join(result.stdout.split())


def test_a_missing_set_is_refused_before_the_model_loads(runs, tmp_path, monkeypatch):
    from sve_cli import evaluate
    from sve_cli.errors import SveError

    def load_ensemble(*args, **kwargs):
        raise AssertionError("the model was loaded before the sets were read")

    monkeypatch.setattr(evaluate, "load_ensemble", load_ensemble)
    for options in ({"ood": [str(tmp_path / "missing.jsonl")]}, {"data": str(tmp_path / "missing.jsonl")},
                    {"ood": ["svhn"]}, {"ood": ["digits"]}):
        with pytest.raises(SveError, match="missing.jsonl|holds images, but this run classifies text"):
            evaluate.evaluate_run(runs["sve"], **options)


def _bankless(runs, tmp):
    target = tmp / "bankless"
    target.mkdir()
    (target / "recipe.yaml").write_text((runs["sve"] / "recipe.yaml").read_text())
    return target


def _empty(tmp):
    (tmp / "empty.jsonl").write_text("")
    return tmp / "empty.jsonl"
