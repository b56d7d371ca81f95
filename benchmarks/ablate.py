"""One factor at a time: what makes SVE calibrated on MiniLM + tweets (docs/results.md, ablation).

Every variant is the quickstart recipe at the plain reference implementation's budget (3,000
training tweets, 2 epochs, batch 32, length 48, AdamW lr 1e-3 without weight decay, 1,000
validation and 1,000 test tweets) plus the overrides named below; each is trained in its own
process (reusing a finished run, as benchmarks/compare.py does), evaluated on the test split with
1,000 BBC News articles as the OOD set, and printed as one table row.

    .venv/bin/python benchmarks/ablate.py                       # every variant, seed 0
    .venv/bin/python benchmarks/ablate.py --variants pooler mean shuffled --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import REPO, run_one  # noqa: E402  (the same training/reuse helper)

RECIPE = "recipes/quickstart.yaml"
REFERENCE_BUDGET = {"task.max_train_examples": 3000, "task.max_eval_examples": 1000, "task.max_length": 48,
                    "train.epochs": 2, "train.batch_size": 32, "train.lr": 1e-3, "train.weight_decay": 0.0,
                    "ensemble.method": "sve", "ensemble.members": 4,
                    # the starting point of every factor: the former defaults (the recipe now sets others)
                    "ensemble.dropout": True, "train.member_batches": "shared"}
SVF = {"ensemble.method": "svf", "ensemble.members": 1}
VARIANTS = {  # name -> (what changes, overrides on top of the reference budget)
    "pooler": ("head reads BERT's pooler (the former default)", {"ensemble.representation": "pooler"}),
    "mean": ("head reads the mean-pooled tokens (MiniLM's own pooling)", {"ensemble.representation": "auto"}),
    "mean-nodropout": ("mean, backbone dropout off", {"ensemble.dropout": False}),
    "shuffled": ("mean, each member its own data order", {"train.member_batches": "shuffled"}),
    "bootstrap": ("mean, each member its own bootstrap resample", {"train.member_batches": "bootstrap"}),
    "shuffled-init0.001": ("shuffled, sigma_init 0.001", {"train.member_batches": "shuffled", "ensemble.sigma_init": 0.001}),
    "shuffled-init0.1": ("shuffled, sigma_init 0.1", {"train.member_batches": "shuffled", "ensemble.sigma_init": 0.1}),
    "shuffled-nodropout": ("shuffled, backbone dropout off", {"train.member_batches": "shuffled", "ensemble.dropout": False}),
    "shuffled-nodropout-lr3e-3": ("shuffled, dropout off, lr 3e-3",
                                  {"train.member_batches": "shuffled", "ensemble.dropout": False, "train.lr": 3e-3}),
    "svf-pooler": ("SVF (M=1), pooler", {**SVF, "ensemble.representation": "pooler"}),
    "svf-mean": ("SVF (M=1), mean", SVF),
    "svf-nodropout": ("SVF (M=1), mean, dropout off", {**SVF, "ensemble.dropout": False}),
}
COLUMNS = [("accuracy", "Acc (%)", 100), ("ece", "ECE (%)", 100), ("nll", "NLL", 1), ("disagreement", "disagr. (%)", 100)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablate")
    args = parser.parse_args()

    from sve_cli.evaluate import evaluate_run
    from sve_cli.report import write_report

    rows = []
    for name in args.variants:
        what, overrides = VARIANTS[name]
        reports = []
        for seed in args.seeds:
            out = args.out / f"{name}-seed{seed}"
            cost, reused = run_one(RECIPE, out, {**REFERENCE_BUDGET, **overrides, "train.seed": seed}, fresh=False)
            if reused and (out / "report" / "report.json").exists():
                report = json.loads((out / "report" / "report.json").read_text())
            else:
                report = write_report(evaluate_run(out, ood=["bbc_news"]), out / "report", 15, "probs", True)
            reports.append({**report, "seconds": cost["seconds"]})
            print(f"{name} seed {seed}: acc {report['metrics']['accuracy']:.4f} ece {report['metrics']['ece']:.4f} "
                  f"nll {report['metrics']['nll']:.4f} ({cost['seconds']:.0f} s)", flush=True)
        cells = [name, what]
        for key, _, scale in COLUMNS:
            values = [scale * r["metrics"][key] for r in reports]
            cells.append(f"{statistics.mean(values):.2f}" if scale == 100 else f"{statistics.mean(values):.3f}")
        for score in ("entropy", "mutual_information"):
            values = [100 * r["ood"]["bbc_news"][score]["auroc"] for r in reports if score in r["ood"]["bbc_news"]]
            cells.append(f"{statistics.mean(values):.1f}" if values else "—")
        cells.append(f"{statistics.median(r['seconds'] for r in reports):.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    header = ["variant", "what changes", *[label for _, label, _ in COLUMNS], "AUROC entropy (%)", "AUROC MI (%)",
              "train s"]
    table = "\n".join([f"MiniLM + tweets, reference budget, seeds {args.seeds}, {date.today()}.", "",
                       "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
