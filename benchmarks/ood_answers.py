"""Where an ensemble's OOD inputs land: per ensemble run, the OOD AUROCs beside the raw means of the entropy and
the mutual information on the test and OOD inputs, and how the ensemble answered the OOD inputs.

Reads what `sve evaluate RUN --ood NAME --save-predictions` (and `benchmarks/compare.py`) wrote under
RUN/report/; prints one markdown row per run (docs/results.md §6d).

    .venv/bin/python benchmarks/ood_answers.py runs/compare-sve-shuffled/tweets_mc/sve-lr0.03-seed*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sve_cli.metrics import Prediction


def row(run: Path) -> str:
    report = json.loads((run / "report" / "report.json").read_text())
    predictions = load_file(str(run / "report" / "predictions.safetensors"))
    ood_name = next(iter(report["ood"]))
    inside = Prediction.of(predictions["logits"])  # raw: before the run's temperature
    outside = Prediction.of(predictions[f"ood.{ood_name}.logits"])
    answers = torch.bincount(outside.probs.argmax(-1), minlength=outside.probs.shape[-1]).tolist()  # [C]
    scores, metrics = report["ood"][ood_name], report["metrics"]
    mi_auroc = scores.get("mutual_information", {}).get("auroc")
    return (f"| {run} | {100 * metrics['accuracy']:.1f} | {100 * metrics.get('disagreement', 0):.1f} | "
            f"{'—' if mi_auroc is None else f'{100 * mi_auroc:.1f}'} | {100 * scores['entropy']['auroc']:.1f} | "
            f"{inside.scores['mutual_information'].mean():.3f} / {outside.scores['mutual_information'].mean():.3f} | "
            f"{inside.scores['entropy'].mean():.3f} / {outside.scores['entropy'].mean():.3f} | "
            f"{' / '.join(map(str, answers))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories evaluated with --save-predictions")
    args = parser.parse_args()
    print("| run | Acc (%) | ID disagr. (%) | MI AUROC (%) | entropy AUROC (%) | mean MI ID / OOD | "
          "mean entropy ID / OOD | OOD answered (per class) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run))


if __name__ == "__main__":
    main()
