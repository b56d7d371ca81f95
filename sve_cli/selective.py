"""Selective prediction: answer the inputs the ensemble is sure of, hand the rest to a person.

Every uncertainty score (`msp`, `entropy`, `mutual_information`; higher = less sure) orders the
examples; accepting the `n` surest gives coverage `n / N` and selective risk = the error rate
among them. The risk–coverage curve takes every `n`, AURC is its mean (the area under it, as in
Geifman & El-Yaniv), and accuracy at coverage c accepts the `ceil(c·N)` surest.

Thresholds are fitted on the validation split: for a coverage level c the threshold is the score
of the `ceil(c·N)`-th surest validation example (accept a new input when its score is at most the
threshold); for a target risk r it is the threshold of the largest coverage whose validation risk
is at most r. `sve evaluate` stores them in the run directory (`thresholds.json`), `sve predict
--abstain-coverage c` applies them to new inputs.
"""

from __future__ import annotations

import math

import torch

from sve_cli.metrics import Prediction

REPORTED_COVERAGES = (0.8, 0.9, 0.95)
THRESHOLD_COVERAGES = tuple(round(0.5 + 0.01 * i, 2) for i in range(50)) + (0.995,)  # 0.50, 0.51, …, 0.99, 0.995
TARGET_RISKS = (0.01, 0.02, 0.05, 0.1, 0.2)


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Surest first; ties keep their input order (a stable sort), so results are reproducible."""
    return torch.sort(scores.double(), stable=True).indices


def risk_coverage(scores: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage `[N]`, selective risk `[N]`) when accepting the 1, 2, …, N surest examples."""
    errors = (~correct.bool())[_order(scores)].double()  # [N], surest first
    accepted = torch.arange(1, len(errors) + 1, dtype=torch.float64)
    return accepted / len(errors), errors.cumsum(0) / accepted


def accepted_count(coverage: float, total: int) -> int:
    return max(1, min(total, math.ceil(coverage * total - 1e-9)))


def selective_metrics(prediction: Prediction, labels: torch.Tensor) -> dict[str, dict]:
    """Per score: AURC and accuracy at the reported coverages."""
    correct = prediction.probs.argmax(-1) == labels
    results = {}
    for name, scores in prediction.scores.items():
        _, risk = risk_coverage(scores, correct)
        ordered = correct[_order(scores)].double()
        results[name] = {"aurc": float(risk.mean()),
                         "accuracy_at_coverage": {f"{c:g}": float(ordered[:accepted_count(c, len(ordered))].mean())
                                                  for c in REPORTED_COVERAGES}}
    return results


def fit_thresholds(prediction: Prediction, labels: torch.Tensor) -> dict[str, dict]:
    """Per score: the threshold for each coverage level and each target risk, on held-out predictions."""
    return fit_score_thresholds(prediction.scores, prediction.probs.argmax(-1) == labels)


def fit_score_thresholds(named_scores: dict[str, torch.Tensor], correct: torch.Tensor) -> dict[str, dict]:
    """`fit_thresholds` for any scores `[N]` (higher = less sure) and whether each answer was right `[N]`
    (a generated answer: its ROUGE-L is at least `answers.WRONG_BELOW`)."""
    fitted = {}
    for name, scores in named_scores.items():
        ordered = scores.double()[_order(scores)]  # [N] ascending
        coverage, risk = risk_coverage(scores, correct)
        by_coverage = {f"{c:g}": float(ordered[accepted_count(c, len(ordered)) - 1]) for c in THRESHOLD_COVERAGES}
        by_risk = {}
        for target in TARGET_RISKS:
            allowed = torch.nonzero(risk <= target).flatten()
            if len(allowed):
                last = int(allowed[-1])
                by_risk[f"{target:g}"] = {"threshold": float(ordered[last]), "coverage": float(coverage[last])}
        fitted[name] = {"coverage": by_coverage, "risk": by_risk}
    return fitted
