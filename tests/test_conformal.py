"""Split conformal prediction against MAPIE on the same probabilities, the finite-sample quantile by hand,
and the guarantee it promises, measured."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sve_cli.vocabulary import CONFORMAL_SCORES

from sve_cli import conformal
from sve_cli.metrics import Prediction


def _probabilities(n: int, classes: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, classes, generator=generator) * 1.5  # [N, M, C]
    prediction = Prediction.of(logits)
    labels = torch.multinomial(prediction.probs.float(), 1, generator=generator)[:, 0]  # a calibrated model
    return prediction, labels


def test_finite_sample_quantile_on_a_hand_made_example():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # level 0.8: ⌈10 · 0.8⌉ = 8 -> the 8th smallest (0.8); level 0.9: ⌈9⌉ = 9 -> the largest (0.9)
    assert conformal.quantile(scores, 0.8) == pytest.approx(0.8)
    assert conformal.quantile(scores, 0.9) == pytest.approx(0.9)
    assert conformal.quantile(scores, 0.95) == math.inf  # ⌈9.5⌉ = 10 > n: no finite threshold, every label
    assert conformal.quantile(scores, 0.5) == pytest.approx(0.5)  # ⌈5⌉ = 5


def test_lac_thresholds_and_sets_equal_mapies():
    from benchmarks.conformal_mapie import mapie_sets

    calibration, labels = _probabilities(400)
    test, _ = _probabilities(300, seed=1)
    for level in conformal.LEVELS:
        sets, threshold = mapie_sets(calibration.probs.numpy(), labels.numpy(), test.probs.numpy(), "lac", level)
        ours = conformal.fit(calibration, labels, (level,))["lac"][f"{level:g}"]
        assert ours == pytest.approx(threshold, abs=1e-12)
        assert np.array_equal(conformal.prediction_sets(test.probs, "lac", ours).numpy(), sets)


@pytest.mark.parametrize("score", ["aps", "raps"])
def test_aps_and_raps_scores_and_sets_equal_mapies_non_randomised_ones(score):
    """MAPIE's calibration scores for aps/raps are randomised (a uniform draw per example); their
    deterministic part and its sets at a threshold (`include_last_label=True`) are ours."""
    from mapie.conformity_scores.sets.aps import APSConformityScore
    from mapie.conformity_scores.sets.raps import RAPSConformityScore

    calibration, labels = _probabilities(400)
    probs = calibration.probs.numpy()
    cumulative, rank = APSConformityScore.get_true_label_cumsum_proba(labels.numpy(), probs, np.arange(5))
    expected = cumulative[:, 0]
    if score == "raps":
        expected = RAPSConformityScore._regularize_conformity_score(
            np.array([conformal.RAPS_K_REG]), conformal.RAPS_LAMBDA, cumulative.copy(), rank)[:, 0, 0]
    np.testing.assert_allclose(conformal.calibration_scores(calibration.probs, labels, score).numpy(), expected, atol=1e-12)
    threshold = conformal.quantile(conformal.calibration_scores(calibration.probs, labels, score), 0.9)
    sets = conformal.prediction_sets(calibration.probs, score, threshold).numpy()
    scorer = APSConformityScore() if score == "aps" else RAPSConformityScore()
    scorer.quantiles_ = np.array([threshold])
    if score == "raps":
        scorer.k_star, scorer.lambda_star = np.array([conformal.RAPS_K_REG]), np.array([conformal.RAPS_LAMBDA])
    theirs = scorer.get_prediction_sets(probs[:, :, None], expected, np.array([0.1]), cv="prefit", include_last_label=True)
    assert np.array_equal(sets, theirs[:, :, 0])


@pytest.mark.parametrize("score", CONFORMAL_SCORES)
def test_coverage_holds_on_exchangeable_data(score):
    """A perfectly calibrated model, 2,000 calibration and 20,000 test examples: coverage is at least the
    level (up to sampling noise) and at most level + 1/(n+1) + noise for lac."""
    calibration, labels = _probabilities(2000, seed=3)
    test, test_labels = _probabilities(20000, seed=4)
    thresholds = conformal.fit(calibration, labels)
    report = conformal.evaluate(test, test_labels, {score: thresholds[score]}, labels)
    for level in conformal.LEVELS:
        numbers = report[f"{level:g}"][score]
        assert numbers["coverage"] >= level - 0.012, (level, numbers)
        assert 1 <= numbers["mean_set_size"] <= 5 or score == "lac"
        if score != "lac":
            assert numbers["empty"] == 0.0  # aps/raps sets always hold the most probable label
        assert set(numbers["coverage_per_class"]) == {"0", "1", "2", "3", "4"}


def test_coverage_interval_is_the_beta_binomial_law():
    from scipy.stats import betabinom

    for n, level, test in ((200, 0.9, 500), (1000, 0.8, 300), (50, 0.95, 1000), (9, 0.9, 100)):
        l = math.floor((n + 1) * (1 - level) + 1e-9)
        law = betabinom(test, n + 1 - l, l)
        low, high = conformal.coverage_interval(n, level, test)
        assert (low * test, high * test) == (law.ppf(0.025), law.ppf(0.975)), (n, level, test)
    assert conformal.coverage_interval(5, 0.95, 100) == (1.0, 1.0)  # no finite threshold: every label


def test_class_conditional_sets_cover_every_class():
    """A class the model does not recognise (some of its examples look like the others): marginal sets
    under-cover it, class-conditional sets do not."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(24000, 2, 4, generator=generator) * 1.5  # [N, M, C]
    prediction = Prediction.of(logits)
    labels = torch.multinomial(prediction.probs.float(), 1, generator=generator)[:, 0]
    labels[(labels != 3) & (torch.rand(len(labels), generator=generator) < 0.15)] = 3  # a hard class
    calibration, test = slice(0, 8000), slice(8000, None)

    def part(rows):
        return Prediction.of(prediction.logits[rows])

    fitted = conformal.fit_by_class(part(calibration), labels[calibration])
    marginal = conformal.evaluate(part(test), labels[test], conformal.fit(part(calibration), labels[calibration]),
                                  labels[calibration])
    by_class = conformal.evaluate(part(test), labels[test], fitted, labels[calibration])
    for score in CONFORMAL_SCORES:
        for c, covered in by_class["0.9"][score]["coverage_per_class"].items():  # within the law's 99.9% range
            n, tested = int((labels[calibration] == int(c)).sum()), int((labels[test] == int(c)).sum())
            assert covered >= conformal.coverage_interval(n, 0.9, tested, mass=0.999)[0], (score, c, covered)
        sets = conformal.prediction_sets(part(test).probs, score, fitted[score]["0.9"])
        by_hand = conformal.label_scores(part(test).probs, score) <= torch.tensor(fitted[score]["0.9"], dtype=torch.float64)[None] + 1e-12
        assert torch.equal(sets, by_hand)
    assert marginal["0.9"]["lac"]["lowest_class_coverage"] < by_class["0.9"]["lac"]["lowest_class_coverage"]


def test_a_class_missing_from_validation_is_said():
    prediction, labels = _probabilities(300, seed=2)
    labels[labels == 4] = 0  # no example of class 4 in the calibration split
    test, test_labels = _probabilities(300, seed=6)
    report = conformal.evaluate(test, test_labels, conformal.fit(prediction, labels), labels)
    assert report["0.9"]["lac"]["uncalibrated_classes"] == [4]
    fitted = conformal.fit_by_class(prediction, labels)
    assert all(values[4] == math.inf for levels in fitted.values() for values in levels.values())


def test_sets_hold_the_predicted_label_whenever_they_are_not_empty():
    prediction, labels = _probabilities(500, seed=5)
    for score in CONFORMAL_SCORES:
        for threshold in (0.05, 0.3, 0.6, 0.95, math.inf):
            sets = conformal.prediction_sets(prediction.probs, score, threshold)
            predicted = sets.gather(-1, prediction.probs.argmax(-1, keepdim=True))[:, 0]
            assert bool((predicted | ~sets.any(-1)).all()), (score, threshold)


# --------------------------------------------------------------------------- evaluate and predict


@pytest.fixture(scope="module")
def evaluated(text_models, tmp_path_factory):
    from conftest import sentiment_file, train_run
    from sve_cli.evaluate import evaluate_run
    from sve_cli.report import fitted_payloads, write_report
    from sve_cli.rundir import write_fitted

    root = tmp_path_factory.mktemp("conformal")
    run = train_run(root, "run", text_models["bert"], sentiment_file(root, count=200), ensemble={"members": 3},
                    train={"lr": 5e-2, "max_steps": 6, "eval_every_steps": 6})
    evaluation = evaluate_run(run)
    report = write_report(evaluation, run / "report", save_predictions=True)
    write_fitted(run, *fitted_payloads(evaluation))
    return run, evaluation, report


def test_evaluate_reports_every_score_at_every_level_as_recomputed_from_its_predictions(evaluated):
    from safetensors.torch import load_file

    run, evaluation, report = evaluated
    saved = load_file(run / "report" / "predictions.safetensors")
    validation, test = Prediction.of(saved["validation.logits"]), Prediction.of(saved["logits"])
    thresholds = conformal.fit(validation, saved["validation.labels"])
    expected = conformal.evaluate(test, saved["labels"], thresholds, saved["validation.labels"])
    assert set(report["conformal"]) == {"0.8", "0.9", "0.95"}
    for level, scores in expected.items():
        assert set(report["conformal"][level]) == {"lac", "aps", "raps"}
        for score, numbers in scores.items():
            for key in ("coverage", "mean_set_size", "singletons", "empty"):
                assert report["conformal"][level][score][key] == pytest.approx(numbers[key], abs=1e-12)
    markdown = (run / "report" / "report.md").read_text()
    assert "Conformal prediction sets" in markdown and "| 0.9 | aps |" in markdown
    fitted = json.loads((run / "conformal.json").read_text())
    assert fitted["combine"] == "probs" and set(fitted["scores"]) == {"lac", "aps", "raps"}
    assert (run / "report" / "conformal.png").stat().st_size > 1000
    by_class = conformal.evaluate(test, saved["labels"], conformal.fit_by_class(validation, saved["validation.labels"]),
                                  saved["validation.labels"])
    for level, scores in by_class.items():
        for score, numbers in scores.items():
            assert report["conformal_by_class"][level][score]["coverage"] == pytest.approx(numbers["coverage"], abs=1e-12)
    assert "Class-conditional (Mondrian) sets" in markdown and "expected 95% range" in markdown
    assert len(fitted["class_scores"]["lac"]["0.9"]) == 2


@pytest.mark.parametrize("score,mode", [("aps", "marginal"), ("lac", "class")])
def test_predict_writes_each_row_the_set_its_threshold_gives(sve, evaluated, tmp_path, score, mode):
    """Marginal sets (one threshold; aps sets always hold the prediction) and class-conditional ones (label y
    in the set when its score is at most y's own threshold), each as recomputed from the written probabilities."""
    from conftest import sentiment_file

    run, _, _ = evaluated
    result = sve("predict", run, "--data", sentiment_file(tmp_path, count=40), "--out", tmp_path / "sets.jsonl",
                 "--conformal", "0.9", "--conformal-score", score, "--conformal-mode", mode)
    assert result.code == 0, result.stderr
    said = f"{score} sets at 90% coverage" if mode == "marginal" else f"class-conditional {score} sets at 90% coverage"
    assert said in " ".join(result.stdout.split())
    fitted = json.loads((run / "conformal.json").read_text())
    threshold = fitted["scores"][score]["0.9"] if mode == "marginal" else \
        [math.inf if t is None else t for t in fitted["class_scores"][score]["0.9"]]
    for row in (json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()):
        probs = torch.tensor([list(row["probabilities"].values())], dtype=torch.float64)
        expected = conformal.prediction_sets(probs, score, threshold)[0]
        assert row["prediction_set"] == [name for name, kept in zip(row["probabilities"], expected) if kept]
        assert row["set_size"] == len(row["prediction_set"])
        if score == "aps":
            assert row["prediction"] in row["prediction_set"]


def test_predict_refuses_sets_it_cannot_promise(sve, evaluated, text_models, tmp_path):
    from conftest import assert_one_error_line, sentiment_file, train_run

    run, _, _ = evaluated
    data = sentiment_file(tmp_path, count=20)
    assert_one_error_line(sve("predict", run, "--data", data, "--out", tmp_path / "a.jsonl", "--conformal", "0.85"),
                          "--conformal 0.85 with --conformal-score lac was not fitted")
    fresh = train_run(tmp_path, "fresh", text_models["bert"], data, train={"max_steps": 2})
    assert_one_error_line(sve("predict", fresh, "--data", data, "--out", tmp_path / "b.jsonl", "--conformal", "0.9"),
                          "no conformal thresholds for this ensemble: run `sve evaluate`")
    assert_one_error_line(sve("predict", run, "--data", data, "--out", tmp_path / "c.jsonl", "--conformal", "0.9",
                              "--member", "1"), "fitted for the whole ensemble")
    assert_one_error_line(sve("predict", run, "--data", data, "--out", tmp_path / "x.jsonl", "--conformal-mode", "class"),
                          "--conformal-mode chooses how --conformal builds its sets")
