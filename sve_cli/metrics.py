"""Calibration metrics on ensemble predictions (conventions of DESIGN.md).

- predictions combine members by the mean of probabilities (default) or the mean of logits;
- NLL: natural log, mean over examples; Brier: sum over classes of squared error, mean over
  examples (range 0–2); ECE: equal-width bins on top-1 confidence, `(lo, hi]` bins (a confidence
  of exactly 0 falls in the first bin); adaptive ECE: equal-mass bins; MCE: the largest bin gap.
"""

from __future__ import annotations

import torch

CONVENTIONS = {
    "combine": "members are combined by the mean of their probabilities (or of their logits when asked)",
    "nll": "natural log, mean over examples",
    "brier": "sum over classes of squared error, mean over examples (0-2)",
    "ece": "equal-width bins on top-1 confidence, (lo, hi] bins, |accuracy - confidence| weighted by bin mass",
    "adaptive_ece": "the same with equal-mass bins",
    "mce": "the largest |accuracy - confidence| over non-empty equal-width bins",
}


def combine(logits: torch.Tensor, how: str = "probs") -> torch.Tensor:
    """`[N, M, C]` member logits -> `[N, C]` ensemble probabilities."""
    logits = logits.double()
    if how == "logits":
        return logits.mean(dim=1).softmax(dim=-1)
    return logits.softmax(dim=-1).mean(dim=1)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=-1) == labels).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = probs[torch.arange(len(labels)), labels].clamp_min(torch.finfo(probs.dtype).tiny)
    return float(-picked.log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return float((probs - onehot).square().sum(dim=-1).mean())


def _bin_gaps(confidence: torch.Tensor, correct: torch.Tensor, bins: torch.Tensor, count: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bin: |accuracy - confidence| and the number of examples (`bins` holds each row's bin)."""
    sizes = torch.bincount(bins, minlength=count).double()
    confidence_sum = torch.zeros(count, dtype=torch.float64).index_add_(0, bins, confidence.double())
    correct_sum = torch.zeros(count, dtype=torch.float64).index_add_(0, bins, correct.double())
    gaps = (correct_sum - confidence_sum).abs() / sizes.clamp_min(1)
    return gaps, sizes


def equal_width_bins(confidence: torch.Tensor, count: int) -> torch.Tensor:
    """Bin index of each confidence for `(lo, hi]` bins of width 1/count."""
    return (torch.ceil(confidence.double() * count) - 1).clamp(0, count - 1).long()


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=-1)
    gaps, sizes = _bin_gaps(confidence, predicted == labels, equal_width_bins(confidence, bins), bins)
    return float((gaps * sizes).sum() / len(labels))


def mce(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    confidence, predicted = probs.max(dim=-1)
    gaps, sizes = _bin_gaps(confidence, predicted == labels, equal_width_bins(confidence, bins), bins)
    return float(gaps[sizes > 0].max())


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-mass bins: examples sorted by confidence, split into `bins` near-equal groups."""
    confidence, predicted = probs.max(dim=-1)
    order = confidence.argsort(stable=True)
    assignment = torch.empty_like(order)
    assignment[order] = torch.arange(len(order)) * min(bins, len(order)) // len(order)
    gaps, sizes = _bin_gaps(confidence, predicted == labels, assignment, min(bins, len(order)))
    return float((gaps * sizes).sum() / len(labels))


def disagreement(logits: torch.Tensor, probs: torch.Tensor) -> float:
    """Mean over members of the fraction of examples whose argmax differs from the ensemble's."""
    return float((logits.argmax(dim=-1) != probs.argmax(dim=-1)[:, None]).double().mean())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15, how: str = "probs") -> dict:
    """Every calibration number for `[N, M, C]` logits."""
    probs = combine(logits, how)
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, bins),
        "adaptive_ece": adaptive_ece(probs, labels, bins),
        "mce": mce(probs, labels, bins),
        "disagreement": disagreement(logits, probs),
        "member_accuracy": [accuracy(logits[:, m].double().softmax(-1), labels) for m in range(logits.shape[1])],
    }


HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "ece": False, "brier": False}
