"""The names sve's concepts go by, declared once.

Every table, report, recipe key and CLI choice reads these tuples (torch-free: the recipe and the command
line read them at start-up). Adding a metric: declare it here, compute it in `metrics.calibration_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One number of a prediction, declared once: every table, report, `eval.metric` and CLI reads this."""

    key: str  # in calibration_metrics' dict and in report.json
    label: str  # in tables
    percent: bool  # shown × 100
    higher_is_better: bool
    meaning: str  # the convention, in report.json's "conventions"

    @property
    def heading(self) -> str:
        return self.label + (" (%)" if self.percent else "")

    def format(self, value: float) -> str:
        return f"{100 * value:.2f}" if self.percent else f"{value:.4f}"


METRICS = (
    Metric("accuracy", "Acc", True, True, "share of examples whose most probable class is the label"),
    Metric("nll", "NLL", False, False, "natural log, mean over examples"),
    Metric("brier", "Brier", False, False, "sum over classes of squared error, mean over examples (0-2)"),
    Metric("ece", "ECE", True, False, "equal-width bins on top-1 confidence, (lo, hi] bins, |accuracy - confidence| "
           "weighted by bin mass"),
    Metric("adaptive_ece", "aECE", True, False, "the same with equal-mass bins"),
    Metric("mce", "MCE", True, False, "the largest |accuracy - confidence| over non-empty equal-width bins"),
    Metric("disagreement", "disagreement", True, False, "fraction of examples where a member's argmax differs from "
           "the ensemble's, mean over members"),
)
# how good a generation run's free-running answers are (not a number of a prediction: decoding makes them)
ANSWER_METRICS = (Metric("rouge_l", "ROUGE-L", True, True, "ROUGE-L F-measure of the greedy answers against the "
                         "references, mean over examples"),)
METRIC = {metric.key: metric for metric in METRICS + ANSWER_METRICS}
# measured on the validation split at every evaluation during training; `eval.metric` picks the best step by one
VALIDATION_METRICS = ("accuracy", "nll", "brier", "ece")
EVAL_METRICS = VALIDATION_METRICS + tuple(metric.key for metric in ANSWER_METRICS)  # what eval.metric may name

UNCERTAINTY_SCORES = ("entropy", "msp", "mutual_information")  # higher = less sure; MI needs M > 1
CONFORMAL_SCORES = ("lac", "aps", "raps")
REPRESENTATIONS = ("pooler", "cls", "mean", "max", "last_token", "cls_mean")  # what a head reads
