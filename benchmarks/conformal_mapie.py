"""sve's split conformal sets against MAPIE's on real runs' saved predictions.

For each evaluated run (`sve evaluate RUN --save-predictions`, or `benchmarks/compare.py`'s runs), reads
`RUN/report/predictions.safetensors` (every member's logits on the validation and test splits),
combines members the way the report did, fits thresholds on validation and measures the sets on test,
once with `sve_cli.conformal` and once with MAPIE 1.x (`SplitConformalClassifier`, prefit). LAC must
agree exactly; MAPIE's APS/RAPS randomise the calibration scores (a uniform draw per example), so
there the two are compared by coverage and set size.

    .venv/bin/python benchmarks/conformal_mapie.py runs/final/tweets/*-seed0
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np
from safetensors import safe_open

from sve_cli.vocabulary import CONFORMAL_SCORES
from safetensors.torch import load_file

from sve_cli import conformal
from sve_cli.metrics import Prediction


class Fixed:
    """A prefit scikit-learn classifier whose "features" are row indices into fixed probabilities."""

    def __init__(self, probs: np.ndarray):
        self.probs, self.classes_ = probs, np.arange(probs.shape[1])

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(1)

    def __sklearn_is_fitted__(self):
        return True


def mapie_sets(validation: np.ndarray, labels: np.ndarray, test: np.ndarray, score: str, level: float,
               seed: int = 0) -> tuple[np.ndarray, float]:
    """MAPIE's `[N, C]` sets on `test` and its threshold, fitted on `validation`."""
    from mapie.classification import SplitConformalClassifier

    n = len(validation)
    mapie = SplitConformalClassifier(Fixed(np.concatenate([validation, test])), confidence_level=level,
                                     conformity_score=score, prefit=True, random_state=seed)
    mapie.conformalize(np.arange(n)[:, None], labels)
    _, sets = mapie.predict_set(np.arange(n, n + len(test))[:, None])
    return sets[:, :, 0], float(mapie._mapie_classifier.conformity_score_function_.quantiles_[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    args = parser.parse_args()
    print(f"{date.today()}; thresholds fitted on validation, sets measured on test; MAPIE's APS/RAPS randomised "
          "(seed 0), sve's not\n")
    print("| run | N val / test | score | level | threshold sve / MAPIE | coverage sve / MAPIE | mean set size sve / MAPIE "
          "| identical sets |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        path = run / "report" / "predictions.safetensors"
        saved = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            how = handle.metadata()["sve.combine"]
        validation, test = Prediction.of(saved["validation.logits"], how), Prediction.of(saved["logits"], how)
        validation_labels, labels = saved["validation.labels"], saved["labels"]
        for score in CONFORMAL_SCORES:
            calibration = conformal.calibration_scores(validation.probs, validation_labels, score)
            for level in args.levels:
                threshold = conformal.quantile(calibration, level)
                ours = conformal.prediction_sets(test.probs, score, threshold).numpy()
                theirs, their_threshold = mapie_sets(validation.probs.numpy(), validation_labels.numpy(),
                                                     test.probs.numpy(), score, level)
                rows = np.arange(len(labels))
                coverage = [sets[rows, labels.numpy()].mean() for sets in (ours, theirs)]
                size = [sets.sum(1).mean() for sets in (ours, theirs)]
                print(f"| {run.name} | {len(validation_labels)} / {len(labels)} | {score} | {level:g} | "
                      f"{threshold:.4f} / {their_threshold:.4f} | {coverage[0]:.3f} / {coverage[1]:.3f} | "
                      f"{size[0]:.2f} / {size[1]:.2f} | {'yes' if np.array_equal(ours, theirs) else 'no'} |")


if __name__ == "__main__":
    main()
