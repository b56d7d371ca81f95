"""Benchmark: does `train.lr: auto` choose the rate a full grid of complete runs chooses?

`lr: auto` trains each `train.lr_grid` value for a fifth of the run (`sve_cli.tuning.lr_sweep`) and keeps
the best on the validation split. Here the same sweep runs, exactly as `sve train` would run it, on a
setting and budget of `benchmarks/compare.py`, and its choice is set beside what complete runs of that
budget chose on the same validation split (each grid run's best epoch, best accuracy then NLL, read from
the archived records under benchmarks/results/compare/SETTING/METHOD-lrLR-seed0/metrics.jsonl when they
exist for exactly this budget). One sweep per (setting, method): its record is written to
benchmarks/results/lr_auto/SETTING-BUDGET-METHOD.json and a finished one is not run again.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lr_auto.py --setting bbc_mc --budget cpu-upper --methods sve svf \\
        --grid 1e-2 3e-2 1e-1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lr_auto.py --setting tweets --budget reference \\
        --set ensemble.parameterisation=relative --methods sve
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch

from compare import METHODS, REPO, SETTINGS, _flat, _validation_score
from sve_cli.recipe import load_recipe
from sve_cli.tuning import lr_sweep

RECORDS = REPO / "benchmarks" / "results" / "lr_auto"
ARCHIVE = REPO / "benchmarks" / "results" / "compare"


def full_runs(setting: str, method: str, overrides: dict, grid: list[float]) -> dict[float, tuple[float, float]]:
    """Validation (accuracy, NLL) of each archived complete seed-0 run of this budget, by lr."""
    scores = {}
    for lr in grid:
        run = ARCHIVE / setting / f"{method}-lr{lr:g}-seed0"
        if not (run / "cost.json").exists():
            continue
        wanted = _flat({**overrides, **METHODS[method], "train.lr": lr, "train.seed": 0})
        if json.loads((run / "cost.json").read_text()).get("overrides") == wanted:
            accuracy, negative_nll = _validation_score(run)
            scores[lr] = (accuracy, -negative_nll)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--budget", required=True)
    parser.add_argument("--methods", nargs="+", default=["sve"], choices=["sve", "svf", "single", "lora_ensemble"])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                        help="recipe overrides (e.g. ensemble.parameterisation=relative)")
    parser.add_argument("--grid", type=float, nargs="+", default=None,
                        help="train.lr_grid for the sweep (default: the recipe's, sve's default [3e-3, 1e-2, 3e-2])")
    args = parser.parse_args()
    recipe_path, _, budgets = SETTINGS[args.setting]
    overrides = {**budgets[args.budget], **dict(item.split("=", 1) for item in args.extra)}
    grid = {"train.lr_grid": json.dumps(args.grid)} if args.grid else {}
    RECORDS.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        record = RECORDS / f"{args.setting}-{args.budget}-{method}.json"
        recipe = load_recipe(REPO / recipe_path, _flat({**overrides, **METHODS[method], "train.lr": "auto",
                                                         "train.seed": 0, **grid}))
        if not record.exists() or [t["lr"] for t in json.loads(record.read_text())["trials"]] != recipe.train.lr_grid:
            sweep = {**lr_sweep(recipe), "overrides": _flat(overrides), "date": str(date.today()),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
            record.write_text(json.dumps(sweep, indent=2))
        sweep = json.loads(record.read_text())
        full = full_runs(args.setting, method, overrides, recipe.train.lr_grid)
        full_choice = max(full, key=lambda lr: (full[lr][0], -full[lr][1])) if len(full) == len(recipe.train.lr_grid) else None
        trials = "; ".join(f"{t['lr']:g}: " + ("diverged" if t.get("diverged") else
                                               f"{100 * t['accuracy']:.1f}% / {t['nll']:.3f}") for t in sweep["trials"])
        complete = "; ".join(f"{lr:g}: {100 * acc:.1f}% / {nll:.3f}" for lr, (acc, nll) in sorted(full.items())) or "—"
        rows.append([method, f"{sweep['steps']}", trials, f"**{sweep['chosen']:g}**", complete,
                     f"{full_choice:g}" if full_choice else "— (grid incomplete)",
                     "yes" if full_choice == sweep["chosen"] else ("no" if full_choice else "?"),
                     f"{sweep['seconds'] / 60:.1f}"])
    header = ["method", "sweep steps per rate", "sweep: validation acc / NLL", "lr auto chose",
              "complete runs: validation acc / NLL", "complete runs chose", "same", "sweep (min)"]
    print(f"Setting `{args.setting}`, budget `{args.budget}` {overrides}; {date.today()}.\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
