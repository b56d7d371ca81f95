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

Class-conditional (Mondrian) sets fit one threshold per class on that class's validation examples, and a
label y is in the set when its score is at most y's threshold: coverage ≥ the level *within every class*,
where marginal sets may cover a rare or hard class far less. A class with too few validation examples
for a level gets no finite threshold (it is in every set), which the report says.

Reading a set: one label is a confident answer; several are the labels the ensemble cannot tell apart at
that level; an empty set (lac, or any class-conditional set) means no label is plausible enough — an input
to refer to a person rather than to answer. Which score: lac gives the smallest sets on average; aps and
raps grow the set with the ensemble's doubt (never empty); with many classes (≳ 10) raps keeps the tail short.

The coverage measured on N test examples varies around the level: with n calibration examples it follows
a beta-binomial law (Angelopoulos & Bates 2021, §C), whose 95% interval the report gives beside it.
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


def prediction_sets(probs: torch.Tensor, score: str, threshold: float | list[float]) -> torch.Tensor:
    """`[N, C]` booleans: the labels in each input's set at `threshold` (a list: one per class, the
    class-conditional rule `score(x, y) ≤ q_y`)."""
    scores = label_scores(probs, score)
    if isinstance(threshold, (list, tuple)):
        return scores <= torch.tensor(threshold, dtype=scores.dtype)[None, :] + TOLERANCE  # [N, C]
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


def fit_by_class(validation: Prediction, labels: torch.Tensor, levels=LEVELS) -> dict[str, dict[str, list[float]]]:
    """Per score and level, one threshold per class from that class's validation examples (+inf when the
    class has too few of them for the level, or none)."""
    classes = validation.probs.shape[-1]
    fitted: dict[str, dict[str, list[float]]] = {}
    for score in CONFORMAL_SCORES:
        calibration = calibration_scores(validation.probs, labels, score)  # [n]
        fitted[score] = {f"{level:g}": [quantile(calibration[labels == c], level) for c in range(classes)]
                         for level in levels}
    return fitted


def coverage_interval(calibration: int, level: float, test: int, mass: float = 0.95) -> tuple[float, float]:
    """Where the coverage measured on `test` examples falls with probability `mass`, for sets fitted on
    `calibration` examples at `level`: beta-binomial(test, n + 1 − l, l) with l = ⌊(n + 1)(1 − level)⌋."""
    l = math.floor((calibration + 1) * (1 - level) + 1e-9)
    if l <= 0 or test <= 0:
        return 1.0, 1.0  # no finite threshold: every label is in every set
    a, b = calibration + 1 - l, l
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    pmf = [math.exp(math.lgamma(test + 1) - math.lgamma(k + 1) - math.lgamma(test - k + 1)
                    + math.lgamma(k + a) + math.lgamma(test - k + b) - math.lgamma(test + a + b) - log_beta)
           for k in range(test + 1)]
    cumulative, low, high = 0.0, None, test
    for k, p in enumerate(pmf):
        cumulative += p
        if low is None and cumulative >= (1 - mass) / 2:
            low = k
        if cumulative >= 1 - (1 - mass) / 2:
            high = k
            break
    return low / test, high / test


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


def evaluate(test: Prediction, labels: torch.Tensor, thresholds: dict[str, dict[str, float | list[float]]],
             validation_labels: torch.Tensor) -> dict[str, dict[str, dict]]:
    """`report.json["conformal"]` (or `["conformal_by_class"]`, given per-class thresholds): per level, per
    score, the sets' coverage (with the interval it should fall in) and sizes on the test split, and coverage
    per class (where a guarantee on average can hide a class that is rarely covered)."""
    classes = test.probs.shape[-1]
    counts = torch.bincount(validation_labels, minlength=classes)
    report: dict[str, dict[str, dict]] = {}
    for score, by_level in thresholds.items():
        for level, threshold in by_level.items():
            sets = prediction_sets(test.probs, score, threshold)  # [N, C]
            covered = sets.gather(-1, labels[:, None])[:, 0].double()
            sizes = sets.sum(-1).double()
            per_class = {str(c): float(covered[labels == c].mean()) for c in range(classes) if (labels == c).any()}
            by_class = isinstance(threshold, list)
            calibration = min(int(counts[c]) for c in range(classes) if (labels == c).any()) if by_class \
                else len(validation_labels)
            tested = min(int((labels == c).sum()) for c in range(classes) if (labels == c).any()) if by_class \
                else len(labels)
            entry = {
                "threshold": [t if math.isfinite(t) else None for t in threshold] if by_class
                else threshold if math.isfinite(threshold) else None,
                "coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
                "singletons": float((sizes == 1).double().mean()), "empty": float((sizes == 0).double().mean()),
                "coverage_per_class": per_class, "lowest_class_coverage": min(per_class.values()),
                "calibration_examples": int(calibration),
                # marginal: of the coverage; by class: of the least covered class (its own n and test count)
                "expected_coverage_95": list(coverage_interval(calibration, float(level), tested)),
                "uncalibrated_classes": [c for c in range(classes) if by_class and not math.isfinite(threshold[c])]
                if by_class else [c for c in range(classes) if counts[c] == 0]}
            report.setdefault(level, {})[score] = entry
    return report
