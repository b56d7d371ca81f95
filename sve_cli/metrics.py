"""Calibration metrics on ensemble predictions (conventions of docs/design.md).

Members' logits `[N, M, C]` become one `Prediction` (`Prediction.of`), where they are combined once; every
metric, score, threshold and conformal set reads that object, so a run is scored one way everywhere.

- predictions combine members by the mean of probabilities (default) or the mean of logits;
- NLL: natural log, mean over examples; Brier: sum over classes of squared error, mean over
  examples (range 0–2); ECE: equal-width bins on top-1 confidence, `(lo, hi]` bins (a confidence
  of exactly 0 falls in the first bin); adaptive ECE: equal-mass bins; MCE: the largest bin gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from sve_cli.vocabulary import METRICS

CONVENTIONS = {
    "combine": "members are combined by the mean of their probabilities (or of their logits when asked)",
    **{metric.key: metric.meaning for metric in METRICS if metric.key != "accuracy"},
    "ood": "OOD is the positive class; a higher score means more OOD. msp = 1 - max ensemble probability, "
           "entropy = entropy of the ensemble prediction, mutual_information = entropy of the members' mean "
           "probabilities minus the mean of member entropies (BALD; ensembles only, whatever the combine mode); "
           "AUROC, AUPR (average precision), FPR at 95% TPR",
    "calibration": "temperature (eval.calibration, the default): one temperature dividing every member's logits, "
                   "fitted at the end of training by the NLL of the combined prediction on the validation split; "
                   "'metrics' are the calibrated numbers, 'raw_metrics' those of the raw logits",
    "selective": "the examples with the lowest score (msp, entropy or mutual_information) are answered first; "
                 "risk = error rate among the answered; AURC = mean risk over all coverages 1/N … N/N; "
                 "accuracy at coverage c answers the ceil(c·N) surest",
}


def combine(logits: torch.Tensor, how: str = "probs") -> torch.Tensor:
    """`[N, M, C]` member logits -> `[N, C]` ensemble probabilities."""
    logits = logits.double()
    if how == "logits":
        return logits.mean(dim=1).softmax(dim=-1)
    return logits.softmax(dim=-1).mean(dim=1)


@dataclass
class Prediction:
    """An ensemble's prediction on N examples: members' logits combined once (`combine`)."""

    logits: torch.Tensor  # [N, M, C] float64
    how: str  # "probs" or "logits"
    probs: torch.Tensor  # [N, C] the ensemble's probabilities
    member_probs: torch.Tensor  # [N, M, C]

    @classmethod
    def of(cls, logits: torch.Tensor, how: str = "probs") -> "Prediction":
        logits = logits.double()
        return cls(logits, how, combine(logits, how), logits.softmax(dim=-1))

    @property
    def members(self) -> int:
        return self.logits.shape[1]

    def scaled(self, temperature: float) -> "Prediction":
        """Every member's logits divided by one temperature."""
        return Prediction.of(self.logits / temperature, self.how)

    @cached_property
    def scores(self) -> dict[str, torch.Tensor]:
        """Uncertainty scores `[N]`, higher = less sure (more OOD); `mutual_information` for M > 1."""
        scores = {"msp": 1 - self.probs.max(dim=-1).values, "entropy": entropy(self.probs)}
        if self.members > 1:
            member_entropy = entropy(self.member_probs).mean(dim=1)  # [N]
            scores["mutual_information"] = (entropy(self.member_probs.mean(dim=1)) - member_entropy).clamp_min(0)
        return scores


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


def calibration_metrics(prediction: Prediction, labels: torch.Tensor, bins: int = 15) -> dict:
    """Every calibration number of an ensemble prediction."""
    probs, logits = prediction.probs, prediction.logits
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, bins),
        "adaptive_ece": adaptive_ece(probs, labels, bins),
        "mce": mce(probs, labels, bins),
        "disagreement": disagreement(logits, probs),
        "member_accuracy": [accuracy(prediction.member_probs[:, m], labels) for m in range(prediction.members)],
    }


# --------------------------------------------------------------------------- temperature scaling


TEMPERATURE_RANGE = (0.01, 100.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, how: str = "probs") -> float:
    """One temperature T > 0 (parameterised as exp(t)) minimising the NLL of the ensemble whose
    members' logits are divided by T; fitted with L-BFGS on held-out (validation) logits.

    T is kept within TEMPERATURE_RANGE: a model no better than chance on the held-out set has its NLL
    minimum at T -> infinity (uniform probabilities), which would erase every uncertainty score."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    scaled_logits = logits.double()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        probs = combine(scaled_logits / log_t.exp(), how)
        loss = -probs[torch.arange(len(labels)), labels].clamp_min(1e-300).log().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE
    return min(max(float(log_t.detach().exp()), low), high)


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, how: str = "probs") -> dict:
    """What `eval.calibration: temperature` stores with a bank, fitted on held-out `[N, M, C]` logits:
    one temperature for the members' combined prediction (pool, then calibrate), and one for each
    member alone (an exported member folds its own into its classifier)."""
    return {"method": "temperature", "temperature": fit_temperature(logits, labels, how),
            "member_temperatures": [fit_temperature(logits[:, m:m + 1], labels, how) for m in range(logits.shape[1])],
            "combine": how, "examples": len(labels)}


def temperature_of(calibration: dict | None, member: int | None = None) -> float:
    """The temperature a stored calibration gives the ensemble (or member `member`); 1 when there is none."""
    if not calibration or calibration.get("method") != "temperature":
        return 1.0
    return float(calibration["temperature"] if member is None else calibration["member_temperatures"][member])


# --------------------------------------------------------------------------- OOD detection


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Row-wise entropy in nats of `[…, C]` probabilities (0·log 0 = 0)."""
    probs = probs.double()
    return -(probs * probs.clamp_min(1e-300).log()).sum(dim=-1)


def _labelled(in_scores: torch.Tensor, out_scores: torch.Tensor):
    """scikit-learn's inputs: OOD is the positive class (1), a higher score means more OOD."""
    import numpy as np

    scores = torch.cat([in_scores, out_scores]).double().numpy()
    return np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], scores


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve: P(score_ood > score_id) + ½ P(tie)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(in_scores, out_scores)))


def aupr(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Average precision with OOD as the positive class."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(*_labelled(in_scores, out_scores)))


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Fraction of ID examples flagged at the highest threshold that flags ≥ `tpr` of the OOD ones."""
    import numpy as np
    from sklearn.metrics import roc_curve

    false_positive, true_positive, _ = roc_curve(*_labelled(in_scores, out_scores), drop_intermediate=False)
    return float(false_positive[np.argmax(true_positive >= tpr - 1e-12)])


def ood_metrics(inside: Prediction, outside: Prediction) -> dict[str, dict[str, float]]:
    in_scores, out_scores = inside.scores, outside.scores
    return {name: {"auroc": auroc(in_scores[name], out_scores[name]),
                   "aupr": aupr(in_scores[name], out_scores[name]),
                   "fpr_at_95_tpr": fpr_at_tpr(in_scores[name], out_scores[name])}
            for name in in_scores}


def target_metrics(sums: torch.Tensor) -> dict[str, float]:
    """A generation ensemble's validation numbers from `inference.target_sums` rows `[N, M + 3]`: token
    accuracy and NLL of the members' mean distribution, the members' own mean NLL, the target tokens."""
    totals = sums.double().sum(0)  # [M + 3]
    members, tokens = sums.shape[1] - 3, float(totals[-1])
    return {"accuracy": float(totals[-2]) / tokens, "nll": -float(totals[-3]) / tokens,
            "member_nll": -float(totals[:members].sum()) / members / tokens, "tokens": int(tokens)}
