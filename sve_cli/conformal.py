"""Prediction sets with a coverage guarantee: split conformal prediction on the ensemble's prediction.

Fitted on the validation split (n examples), a score's threshold `q` for coverage level 1 − α is the
⌈(n+1)(1−α)⌉-th smallest calibration score (no finite threshold when that rank exceeds n: every label
is then in the set). For a new input, the set holds the labels whose score would not exceed `q`; if the
validation and new inputs are exchangeable, it holds the true label with probability ≥ 1 − α. Scores
(non-randomised):

- `lac`:  1 − p_y (least ambiguous sets; empty sets are possible);
- `aps`:  the mass of the labels at least as probable as y, y included; the set takes labels in order of
          probability up to and including the one whose cumulative mass reaches `q` (never empty);
- `raps`: aps + λ·max(0, rank(y) − k_reg), which penalises long tails of unlikely labels
          (λ = 0.01, k_reg = 1 unless given).

Conventions follow MAPIE's (`include_last_label=True` for aps/raps); the tests compare with it.
"""

from __future__ import annotations

import math

import torch

from sve_cli.metrics import Prediction
from sve_cli.vocabulary import CONFORMAL_SCORES

LEVELS = (0.8, 0.9, 0.95)
RAPS_LAMBDA, RAPS_K_REG = 0.01, 1
TOLERANCE = 1e-12  # scores equal up to rounding count as equal


def _ordered(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, labels by decreasing probability: order `[N, C]`, each label's rank (1-based) `[N, C]`,
    and each label's cumulative mass including it `[N, C]` (in the original label order)."""
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices  # [N, C]
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(1, probs.shape[-1] + 1).expand_as(order))
    cumulative = torch.gather(probs, -1, order).cumsum(-1)  # [N, C] in sorted order
    return order, ranks, torch.empty_like(cumulative).scatter_(-1, order, cumulative)


def label_scores(probs: torch.Tensor, score: str, lam: float = RAPS_LAMBDA, k_reg: int = RAPS_K_REG) -> torch.Tensor:
    """The score every label would have, `[N, C]` (lower = more plausible)."""
    probs = probs.double()
    if score == "lac":
        return 1 - probs
    _, ranks, cumulative = _ordered(probs)
    if score == "aps":
        return cumulative
    if score == "raps":
        return cumulative + lam * (ranks - k_reg).clamp_min(0)
    raise ValueError(f"unknown conformal score '{score}' (use one of {', '.join(CONFORMAL_SCORES)})")


def calibration_scores(probs: torch.Tensor, labels: torch.Tensor, score: str) -> torch.Tensor:
    """Each calibration example's score of its true label, `[N]`."""
    return label_scores(probs, score).gather(-1, labels[:, None])[:, 0]


def quantile(scores: torch.Tensor, level: float) -> float:
    """The ⌈(n+1)·level⌉-th smallest score; +inf when that rank exceeds n."""
    rank = math.ceil((len(scores) + 1) * level - 1e-9)
    if rank > len(scores):
        return math.inf
    return float(torch.sort(scores.double()).values[rank - 1])


def prediction_sets(probs: torch.Tensor, score: str, threshold: float) -> torch.Tensor:
    """`[N, C]` booleans: the labels in each input's set at `threshold`."""
    scores = label_scores(probs, score)
    if score == "lac":
        return scores <= threshold + TOLERANCE
    # aps/raps: labels in order of probability up to and including the first whose score reaches the threshold
    below = scores < threshold - TOLERANCE  # [N, C]
    order, ranks, _ = _ordered(probs.double())
    kept = below.sum(-1, keepdim=True)  # labels strictly below, which come first in the order
    return ranks <= (kept + 1).clamp_max(probs.shape[-1])


def fit(validation: Prediction, labels: torch.Tensor, levels=LEVELS) -> dict[str, dict[str, float]]:
    """Per score and level (as "0.9"), the threshold fitted on held-out predictions."""
    return {score: {f"{level:g}": quantile(calibration_scores(validation.probs, labels, score), level)
                    for level in levels} for score in CONFORMAL_SCORES}


def curve(validation: Prediction, validation_labels: torch.Tensor, test: Prediction, labels: torch.Tensor,
          levels=tuple(0.5 + 0.01 * i for i in range(50))) -> dict[str, list[tuple[float, float]]]:
    """Per score, (test coverage, mean set size) at each level fitted on validation: set size against coverage."""
    points: dict[str, list[tuple[float, float]]] = {}
    for score in CONFORMAL_SCORES:
        calibration = calibration_scores(validation.probs, validation_labels, score)
        for level in levels:
            sets = prediction_sets(test.probs, score, quantile(calibration, level))
            covered = float(sets.gather(-1, labels[:, None]).double().mean())
            points.setdefault(score, []).append((covered, float(sets.sum(-1).double().mean())))
    return points


def evaluate(test: Prediction, labels: torch.Tensor, thresholds: dict[str, dict[str, float]],
             calibration_size: int) -> dict[str, dict[str, dict]]:
    """`report.json["conformal"]`: per level, per score, the sets' coverage and sizes on the test split,
    and coverage per class (where a guarantee on average can hide a class that is rarely covered)."""
    classes = test.probs.shape[-1]
    report: dict[str, dict[str, dict]] = {}
    for score, by_level in thresholds.items():
        for level, threshold in by_level.items():
            sets = prediction_sets(test.probs, score, threshold)  # [N, C]
            covered = sets.gather(-1, labels[:, None])[:, 0].double()
            sizes = sets.sum(-1).double()
            per_class = {str(c): float(covered[labels == c].mean()) for c in range(classes) if (labels == c).any()}
            report.setdefault(level, {})[score] = {
                "threshold": threshold if math.isfinite(threshold) else None,
                "coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
                "singletons": float((sizes == 1).double().mean()), "empty": float((sizes == 0).double().mean()),
                "coverage_per_class": per_class, "lowest_class_coverage": min(per_class.values()),
                "calibration_examples": calibration_size}
    return report
