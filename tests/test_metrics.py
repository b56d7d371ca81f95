"""Every metric against an independent implementation on the same numbers."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss
from torchmetrics.classification import MulticlassCalibrationError

from sve_cli import metrics


def _random(n=400, members=4, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, members, classes, generator=generator) * 2
    labels = torch.randint(0, classes, (n,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("how", ["probs", "logits"])
def test_accuracy_nll_brier_against_scikit_learn(how):
    logits, labels = _random()
    probs = metrics.combine(logits, how)
    expected = logits.double().softmax(-1).mean(1) if how == "probs" else logits.double().mean(1).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert metrics.accuracy(probs, labels) == pytest.approx(float((probs.argmax(1) == labels).double().mean()))
    assert metrics.nll(probs, labels) == pytest.approx(log_loss(labels.numpy(), probs.numpy(), labels=list(range(5))))
    onehot = np.eye(5)[labels.numpy()]
    assert metrics.brier(probs, labels) == pytest.approx(((probs.numpy() - onehot) ** 2).sum(1).mean())
    assert 0 <= metrics.brier(probs, labels) <= 2


@pytest.mark.parametrize("bins", [15, 10])
def test_ece_and_mce_against_torchmetrics(bins):
    logits, labels = _random(n=1000, classes=4)
    probs = metrics.combine(logits)
    for norm, ours in (("l1", metrics.ece), ("max", metrics.mce)):
        reference = MulticlassCalibrationError(num_classes=4, n_bins=bins, norm=norm)(probs.float(), labels)
        assert ours(probs, labels, bins) == pytest.approx(float(reference), abs=1e-6)


def _manual_ece(confidence, correct, bins):
    """(lo, hi] bins written out longhand."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, k) for c, k in zip(confidence, correct) if (lo < c <= hi) or (b == 0 and c == 0)]
        if inside:
            gap = abs(sum(k for _, k in inside) / len(inside) - sum(c for c, _ in inside) / len(inside))
            total += gap * len(inside) / len(confidence)
    return total


def test_ece_edge_cases_on_bin_edges_and_at_one():
    # confidences exactly on edges of 5 bins (0.4, 0.6, 0.8) and at 1.0; (lo, hi] puts 0.6 in (0.4, 0.6]
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.8, 0.2], [1.0, 0.0], [0.5, 0.5], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).tolist()
    assert metrics.equal_width_bins(confidence, 5).tolist() == [2, 2, 3, 4, 2, 2]
    assert metrics.ece(probs, labels, 5) == pytest.approx(_manual_ece(confidence.tolist(), correct, 5))
    assert metrics.ece(torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)) == 0.0


def test_single_class_and_ties():
    probs = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.7, 0.3]], dtype=torch.float64)
    labels = torch.zeros(3, dtype=torch.long)  # one class present only
    assert metrics.ece(probs, labels) == pytest.approx(0.3)
    assert metrics.adaptive_ece(probs, labels) == pytest.approx(0.3)
    assert metrics.mce(probs, labels) == pytest.approx(0.3)
    assert metrics.nll(probs, labels) == pytest.approx(-np.log(0.7))


def test_adaptive_ece_uses_equal_mass_bins():
    confidence = torch.tensor([0.55, 0.6, 0.65, 0.7, 0.9, 0.95], dtype=torch.float64)
    probs = torch.stack([confidence, 1 - confidence], 1)
    labels = torch.tensor([0, 1, 0, 0, 0, 1])
    # 3 bins of 2 by confidence: {0.55, 0.6}, {0.65, 0.7}, {0.9, 0.95}
    expected = (abs(0.5 - 0.575) * 2 + abs(1.0 - 0.675) * 2 + abs(0.5 - 0.925) * 2) / 6
    assert metrics.adaptive_ece(probs, labels, 3) == pytest.approx(expected)


def test_mutual_information_and_entropy_inequalities():
    logits, _ = _random()
    scores = metrics.Prediction.of(logits).scores
    assert (scores["mutual_information"] >= 0).all()
    member_entropy = metrics.entropy(logits.double().softmax(-1)).mean(1)
    assert (scores["entropy"] >= member_entropy - 1e-12).all()  # entropy of the mean >= mean entropy
    agreeing = logits[:, :1].repeat(1, 4, 1)
    assert torch.allclose(metrics.Prediction.of(agreeing).scores["mutual_information"],
                          torch.zeros(400, dtype=torch.float64), atol=1e-12)
    assert "mutual_information" not in metrics.Prediction.of(logits[:, :1]).scores  # one member: not defined


def test_one_prediction_under_logit_averaging():
    """Combining by logits changes the ensemble's probabilities, hence entropy and msp; the mutual
    information stays BALD's (entropy of the members' mean probabilities minus their mean entropy)."""
    logits, _ = _random()
    by_logits = metrics.Prediction.of(logits, "logits")
    probs = logits.double().mean(1).softmax(-1)
    torch.testing.assert_close(by_logits.probs, probs)
    torch.testing.assert_close(by_logits.scores["entropy"], -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(by_logits.scores["msp"], 1 - probs.max(-1).values)
    member = logits.double().softmax(-1)
    bald = -(member.mean(1) * member.mean(1).log()).sum(-1) + (member * member.log()).sum(-1).mean(1)
    torch.testing.assert_close(by_logits.scores["mutual_information"], bald.clamp_min(0))
    torch.testing.assert_close(by_logits.scores["mutual_information"], metrics.Prediction.of(logits).scores["mutual_information"])


@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_against_longhand_definitions(ties):
    """metrics.py uses scikit-learn; here each number is computed from its definition."""
    generator = torch.Generator().manual_seed(1)
    in_scores, out_scores = torch.randn(300, generator=generator), torch.randn(200, generator=generator) + 0.8
    if ties:
        in_scores, out_scores = in_scores.round(decimals=1), out_scores.round(decimals=1)
    pairs = (out_scores[:, None] > in_scores[None, :]).double() + 0.5 * (out_scores[:, None] == in_scores[None, :]).double()
    assert metrics.auroc(in_scores, out_scores) == pytest.approx(float(pairs.mean()), abs=1e-12)
    # average precision: the mean over OOD examples of the precision at their score
    scores = torch.cat([in_scores, out_scores])
    precision_at = [int((out_scores >= t).sum()) / int((scores >= t).sum()) for t in out_scores]
    assert metrics.aupr(in_scores, out_scores) == pytest.approx(sum(precision_at) / len(precision_at), abs=1e-12)
    threshold = np.sort(out_scores.numpy())[::-1][int(np.ceil(0.95 * 200)) - 1]
    assert metrics.fpr_at_tpr(in_scores, out_scores) == pytest.approx(float((in_scores.numpy() >= threshold).mean()))
    assert metrics.fpr_at_tpr(torch.zeros(10), torch.ones(10)) == 0.0 and metrics.auroc(torch.zeros(10), torch.ones(10)) == 1.0


def test_temperature_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(2)
    true_logits = torch.randn(4000, 1, 3, generator=generator) * 3
    labels = torch.multinomial((true_logits[:, 0] / 2.0).softmax(-1), 1, generator=generator)[:, 0]
    fitted = metrics.fit_temperature(true_logits, labels)
    assert fitted > 0 and fitted == pytest.approx(2.0, rel=0.1)
    assert metrics.nll(metrics.combine(true_logits / fitted), labels) < metrics.nll(metrics.combine(true_logits), labels)


def test_disagreement():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])  # members vote 0, 1, 0; ensemble 0
    assert metrics.disagreement(logits, metrics.combine(logits)) == pytest.approx(1 / 3)
    assert metrics.calibration_metrics(metrics.Prediction.of(logits), torch.tensor([0]))["disagreement"] == pytest.approx(1 / 3)


def test_selective_metrics_against_a_longhand_implementation():
    """AURC, accuracy at coverage and the fitted thresholds, recomputed with plain Python loops."""
    from sve_cli.metrics import Prediction, combine
    from sve_cli.selective import fit_thresholds, selective_metrics

    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(203, 3, 4, generator=generator) * 2
    labels = torch.randint(0, 4, (203,), generator=generator)
    correct = (combine(logits).argmax(-1) == labels).tolist()
    prediction = Prediction.of(logits)
    measured, fitted = selective_metrics(prediction, labels), fit_thresholds(prediction, labels)
    for name, scores in prediction.scores.items():
        order = sorted(range(len(correct)), key=lambda i: (float(scores[i]), i))
        risks, errors = [], 0
        for accepted, index in enumerate(order, start=1):
            errors += not correct[index]
            risks.append(errors / accepted)
        assert measured[name]["aurc"] == pytest.approx(sum(risks) / len(risks), abs=1e-12)
        for coverage, value in measured[name]["accuracy_at_coverage"].items():
            keep = math.ceil(float(coverage) * len(order))
            assert value == pytest.approx(sum(correct[i] for i in order[:keep]) / keep, abs=1e-12)
        for coverage, threshold in fitted[name]["coverage"].items():
            answered = sum(float(s) <= threshold for s in scores)
            assert abs(answered - math.ceil(float(coverage) * len(order))) <= 1
        for risk, entry in fitted[name]["risk"].items():
            answered = [i for i in order if float(scores[i]) <= entry["threshold"]]
            assert sum(not correct[i] for i in answered) / len(answered) <= float(risk) + 1e-12
