"""SVE against its baselines on offline data, with sve's own train/evaluate code.

For one setting, trains `single`, `svf`, `sve` (M=4), `deep_ensemble` (M=4) and `lora_ensemble`
(M=4) with the same recipe, data, budget and seeds (selection on validation only), evaluates each on
the test split with the setting's OOD set, and writes a markdown table (mean ± std over seeds) plus
one reliability diagram per method under `--out`.

    .venv/bin/python benchmarks/compare.py --setting tweets --budget reference --seeds 0 1 2 --lr-grid 3e-3 1e-2 3e-2
    .venv/bin/python benchmarks/compare.py --setting digits --seeds 0 1 2
    .venv/bin/python benchmarks/compare.py --setting bbc_mc --budget gpu --seeds 0 1 2 --lr-grid-for sve=3e-3,1e-2,3e-2 \\
        --parallel 6 --ablate sve-M8 sve-init0.1        # on a GPU

With `--lr-grid`, each method's learning rate (of everything it trains, heads included) is chosen
from the same grid on the validation split (first seed; best validation accuracy, then NLL); the
other seeds use the chosen value. Without it, the fixed rates below are used. `--ablate` adds rows
that change one thing of SVE at its chosen rate (first seed).

Each run (train, then evaluate on the test split and the OOD set, with every member's logits saved)
runs in its own process, so its wall time and peak RSS (VmHWM) are its own, and `--parallel N` runs N
of them at once (a GPU is shared). A finished run is reused when its directory holds `cost.json`
written for exactly the same overrides and its `recipe.yaml` equals what they resolve to now (so
seeds can be added later without retraining the others), a run stopped midway resumes from its last
checkpoint; `--fresh` retrains everything, and
`--no-train` only tabulates what is finished. `--archive DIR` copies each run's small record (cost.json,
recipe.yaml, metrics.jsonl, report/report.json: what tabulating and resuming need, no weights) to
DIR/SETTING/RUN, so a grid that outlives a working session continues in the next one:
`cp -r DIR/. runs/compare/` and run the same command again.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch

from sve_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# Every method gets the recipe's lr for its heads; dense fine-tuning (single, deep_ensemble) uses the
# usual lr for the weights it owns (5e-5 on a pretrained backbone, the recipe's on a random one), LoRA
# the usual adapter lr; sigma keeps the recipe's.
LORA_LR = 1e-3
METHODS = {"single": {"ensemble.method": "single", "ensemble.members": 1},
           "svf": {"ensemble.method": "svf", "ensemble.members": 1},
           "sve": {"ensemble.method": "sve", "ensemble.members": 4},
           "deep_ensemble": {"ensemble.method": "deep_ensemble", "ensemble.members": 4},
           "lora_ensemble": {"ensemble.method": "lora_ensemble", "ensemble.members": 4, "train.lr": LORA_LR}}
DENSE_LR = {"tweets": 5e-5, "bbc_mc": 5e-5, "tweets_mc": 5e-5, "digits": None}  # None: the recipe's lr
# One factor of SVE at a time (at its chosen lr, first seed), for `--ablate`
ABLATIONS = {"sve-M8": {"ensemble.members": 8}, "sve-M16": {"ensemble.members": 16},
             "sve-init0.001": {"ensemble.sigma_init": 0.001}, "sve-init0.1": {"ensemble.sigma_init": 0.1},
             "sve-shared-batches": {"train.member_batches": "shared"},
             "sve-shuffled-batches": {"train.member_batches": "shuffled"},
             "sve-head-lr-x0.1": {"head_lr_factor": 0.1}, "sve-head-lr-x10": {"head_lr_factor": 10.0},
             "sve-clamp": {"ensemble.parameterisation": "clamp"}, "svf-clamp": {"ensemble.parameterisation": "clamp"},
             "sve-clamp-sigma-lr0.1": {"ensemble.parameterisation": "clamp", "train.sigma_lr": 0.1, "train.lr": 1e-3},
             "svf-clamp-sigma-lr0.1": {"ensemble.parameterisation": "clamp", "train.sigma_lr": 0.1, "train.lr": 1e-3}}
SETTINGS = {
    "tweets": ("recipes/quickstart.yaml", "bbc_news", {
        "small": {"task.max_train_examples": 1000, "task.max_eval_examples": 400, "train.epochs": 2,
                  "train.batch_size": 16, "task.max_length": 40},
        # the plain reference implementation's budget (../shared/reference/ref_sve_tweets.py)
        "reference": {"task.max_train_examples": 3000, "task.max_eval_examples": 1000, "task.max_length": 48,
                      "train.epochs": 2, "train.batch_size": 32, "train.weight_decay": 0.0},
        "reference-2000": {"task.max_train_examples": 3000, "task.max_eval_examples": 2000, "task.max_length": 48,
                           "train.epochs": 2, "train.batch_size": 32, "train.weight_decay": 0.0},
        "full": {}}),
    "digits": ("recipes/digits_vit.yaml", "mnist", {"small": {"train.epochs": 15}, "full": {}}),
    "bbc_mc": ("recipes/smollm2_bbc_mc.yaml", "tweets", {
        "tiny": {"task.max_train_examples": 80, "task.max_eval_examples": 60, "task.max_length": 128,
                 "train.batch_size": 8},
        "small": {"task.max_train_examples": 480, "task.max_eval_examples": 100, "task.max_length": 96,
                  "train.batch_size": 8},
        # 2 CPU cores: 60 steps of 8 articles of ≤ 96 tokens; the whole validation and test splits
        "cpu": {"task.max_train_examples": 480, "task.max_eval_examples": None, "task.max_length": 96,
                "train.batch_size": 8},
        "cpu-grid": {"task.max_train_examples": 480, "task.max_eval_examples": 100, "task.max_length": 96,
                     "train.batch_size": 8},
        # issue 31 on 2 CPU cores: the upper third of the blocks (attention@20-) for every method, so the
        # 20 blocks below run once per batch; 60 steps of 8 articles of ≤ 96 tokens; 300 validation/test/OOD
        "cpu-upper": {"task.max_train_examples": 480, "task.max_eval_examples": 300, "task.max_length": 96,
                      "train.batch_size": 8, "ensemble.targets": "attention@20-"},
        # every training article, the whole validation and test splits, one epoch (a GPU)
        "gpu": {"task.max_train_examples": None, "task.max_eval_examples": None, "task.max_length": 160,
                "train.batch_size": 16, "train.epochs": 1},
        "full": {}}),
    "tweets_mc": ("recipes/smollm2_tweets_mc.yaml", "bbc_news", {
        "tiny": {"task.max_train_examples": 64, "task.max_eval_examples": 48, "train.batch_size": 8},
        # 2 CPU cores: 60 steps of 8 tweets, one validation at the end; 1,000 validation/test questions
        "cpu": {"task.max_train_examples": 480, "task.max_eval_examples": 1000, "train.batch_size": 8},
        "cpu-grid": {"task.max_train_examples": 480, "task.max_eval_examples": 300, "train.batch_size": 8},
        "cpu-upper": {"task.max_train_examples": 480, "task.max_eval_examples": 300, "train.batch_size": 8,
                      "ensemble.targets": "attention@20-"},
        "gpu": {"task.max_train_examples": 2000}, "full": {}}),
}
ROWS = [("accuracy", "Acc", 100), ("ece", "ECE", 100), ("adaptive_ece", "aECE", 100), ("nll", "NLL", 1),
        ("brier", "Brier", 1)]
RAW_ROWS = [("ece", "raw ECE", 100), ("nll", "raw NLL", 1), ("brier", "raw Brier", 1)]  # before the run's temperature


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(recipe_path: str, out: str, ood: str, overrides: list[str]) -> None:
    """Train (unless `out` was trained for these overrides and only lacks its evaluation) and, when `ood`
    is not "-", evaluate one run in this process; print wall time, peak RSS and trainable share."""
    from sve_cli.checkpoint import open_checkpoint
    from sve_cli.evaluate import evaluate_run
    from sve_cli.report import write_report
    from sve_cli.train import train

    recipe = load_recipe(recipe_path, overrides)
    started = time.perf_counter()
    record = Path(out) / "cost.json"
    # an archived record (no weights) of a run that must now be evaluated is trained again
    trained = record.exists() and json.loads(record.read_text()).get("overrides") == overrides \
        and load_recipe(Path(out) / "recipe.yaml") == recipe \
        and (ood == "-" or (Path(out) / "sigma_bank.safetensors").exists())
    if not trained:  # a run stopped midway (same recipe, a checkpoint) resumes; anything else starts over
        resumable = (Path(out) / "checkpoint.safetensors").exists() and (Path(out) / "recipe.yaml").exists() \
            and load_recipe(Path(out) / "recipe.yaml") == recipe
        train(recipe, Path(out), resume=resumable, overwrite=not resumable)
    seconds = json.loads(record.read_text())["seconds"] if trained else time.perf_counter() - started
    evaluated = time.perf_counter()
    if ood != "-":
        write_report(evaluate_run(Path(out), ood=[ood]), Path(out) / "report", save_predictions=True)
    trainable = _trainable(Path(out) / "sigma_bank.safetensors")
    base = open_checkpoint(recipe.model.path)
    base_parameters = sum(torch.Size(base.shape(n)).numel() for n in base.names)
    print(json.dumps({"seconds": seconds, "evaluate_seconds": time.perf_counter() - evaluated,
                      "peak_rss": peak_rss(), "trainable_share": trainable / base_parameters,
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine()}))


def _trainable(bank: Path) -> int:
    """Values a run trained: every tensor of its bank except the frozen stem."""
    import math

    from safetensors import safe_open

    with safe_open(str(bank), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys() if not name.startswith("stem."))


def _flat(overrides: dict) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in overrides.items()]


def finished(recipe: str, out: Path, overrides: dict, evaluated: bool = True) -> dict | None:
    """The cost of a finished run made with exactly these overrides (and evaluated, when asked), or None."""
    record, report = out / "cost.json", out / "report" / "report.json"
    if not record.exists() or (evaluated and (not report.exists() or "metrics" not in json.loads(report.read_text()))):
        return None  # (a report cut short holds only sve's marker)
    saved = json.loads(record.read_text())
    same = saved.get("recipe") == recipe and saved.get("overrides") == _flat(overrides)
    return saved if same and load_recipe(out / "recipe.yaml") == load_recipe(REPO / recipe, _flat(overrides)) else None


def run_one(recipe: str, out: Path, overrides: dict, ood: str | None, fresh: bool) -> tuple[dict, bool]:
    """Train and (with an `ood` set) evaluate `out`, or reuse it when finished for these overrides;
    returns the cost and whether it was reused."""
    if not fresh and (cost := finished(recipe, out, overrides, ood is not None)) is not None:
        return cost, True
    ood = ood or "-"
    result = subprocess.run([sys.executable, __file__, "--worker", recipe, str(out), ood, *_flat(overrides)],
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"training {out} failed:\n{result.stderr[-3000:]}")
    cost = {**json.loads(result.stdout.strip().splitlines()[-1]), "recipe": recipe, "overrides": _flat(overrides)}
    (out / "cost.json").write_text(json.dumps(cost, indent=2))
    return cost, False


def mean_std(values: list[float], scale: float) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}" if scale == 100 else f"{values[0]:.3f}"
    text = "{:.2f} ± {:.2f}" if scale == 100 else "{:.3f} ± {:.3f}"
    return text.format(statistics.mean(values), statistics.stdev(values))


def _validation_score(out: Path) -> tuple[float, float]:
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda line: (line["accuracy"], -line["nll"]))
    return best["accuracy"], -best["nll"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="tweets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", default="small")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--fresh", action="store_true", help="retrain runs even when cost.json matches")
    parser.add_argument("--no-train", action="store_true", help="tabulate finished runs only")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (each in its own process)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None,
                        help="choose each method's main lr from these on validation (first seed)")
    parser.add_argument("--lr-grid-for", nargs="+", default=[], metavar="METHOD=LR,LR",
                        help="the grid of one method (e.g. sve=1e-3,3e-3), said in the table")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="extra",
                        help="recipe overrides for every method (e.g. ensemble.parameterisation=relative)")
    parser.add_argument("--ablate", nargs="+", default=[], choices=list(ABLATIONS),
                        help="rows that change one thing of SVE (or SVF) at its chosen lr, first seed")
    parser.add_argument("--archive", type=Path, default=None, help="copy every run's small record (no weights) "
                        "to ARCHIVE/SETTING/RUN after tabulating")
    parser.add_argument("--grid-budget", default=None, help="a cheaper budget for the lr grids (validation only; "
                        "the chosen rate is then trained again at --budget)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2], args.worker[3:])
        return

    recipe, ood, budgets = SETTINGS[args.setting]
    extra = dict(item.split("=", 1) for item in args.extra)
    budget = {**budgets[args.budget], **extra}
    grid_budget = {**budgets[args.grid_budget], **extra} if args.grid_budget else budget
    head_lr = load_recipe(REPO / recipe, _flat(budget)).train.lr
    own = {method: [float(v) for v in values.split(",")] for method, values in
           (item.split("=") for item in args.lr_grid_for)}
    grids = {method: own.get(method, args.lr_grid) for method in args.methods}
    pool = ThreadPoolExecutor(max(1, args.parallel))
    root = args.out / args.setting

    def start(name: str, overrides: dict, evaluate: bool = True):
        out = root / name
        if args.no_train:
            return pool.submit(lambda: (finished(recipe, out, overrides, evaluate), True))
        job = pool.submit(run_one, recipe, out, overrides, ood if evaluate else None, args.fresh)
        if args.archive:  # each run's record as soon as it finishes: a grid stopped midway keeps what it did
            job.add_done_callback(lambda _: archive(root, args.archive / args.setting, only=name))
        return job

    def fixed_rates(method: str) -> dict:
        if method in ("single", "deep_ensemble") and DENSE_LR[args.setting]:
            return {"train.lr": DENSE_LR[args.setting], "train.head_lr": head_lr}
        return {"train.head_lr": head_lr} if method == "lora_ensemble" else {}

    # 1. the lr grids (first seed, validation only), all at once
    grid_name = "grid-" if args.grid_budget else ""
    grid_jobs = {(method, lr): start(f"{grid_name}{method}-lr{lr:g}-seed{args.seeds[0]}",
                                     {**grid_budget, **METHODS[method], "train.lr": lr, "train.seed": args.seeds[0]},
                                     evaluate=False)
                 for method in args.methods if grids[method] for lr in grids[method]}
    chosen: dict[str, dict] = {}
    for method in args.methods:
        if not grids[method]:
            chosen[method] = fixed_rates(method)
            continue
        scores = {}
        for lr in grids[method]:
            cost, _ = _wait(grid_jobs[(method, lr)])
            if cost is not None:
                scores[lr] = _validation_score(root / f"{grid_name}{method}-lr{lr:g}-seed{args.seeds[0]}")
                print(f"{args.setting} {method} lr {lr:g}: validation acc {scores[lr][0]:.4f} nll {-scores[lr][1]:.4f}",
                      flush=True)
        if scores:
            chosen[method] = {"train.lr": max(scores, key=scores.get)}

    # 2. every seed at the chosen rate, and the ablations (first seed)
    def name_of(method: str, seed: int) -> str:
        lr = chosen[method].get("train.lr")
        return f"{method}-lr{lr:g}-seed{seed}" if grids[method] else f"{method}-seed{seed}"

    jobs = {(method, seed): start(name_of(method, seed), {**budget, **METHODS[method], **chosen[method], "train.seed": seed})
            for method in args.methods if method in chosen for seed in args.seeds}
    for ablation in args.ablate:
        base = ablation.split("-", 1)[0]
        if base not in chosen:
            continue
        change = dict(ABLATIONS[ablation])
        rates = dict(chosen[base])
        if "head_lr_factor" in change:
            rates["train.head_lr"] = change.pop("head_lr_factor") * rates.get("train.lr", head_lr)
        jobs[(ablation, args.seeds[0])] = start(f"{ablation}-seed{args.seeds[0]}",
                                                {**budget, **METHODS[base], **rates, **change, "train.seed": args.seeds[0]})
    results: dict[str, list[dict]] = {}
    for (method, seed), job in jobs.items():
        cost, _ = _wait(job)
        if cost is None:
            continue
        out = root / (name_of(method, seed) if method in METHODS else f"{method}-seed{seed}")
        report = json.loads((out / "report" / "report.json").read_text())
        results.setdefault(method, []).append({**cost, "run": str(out), "ood": report["ood"][ood], **{
            key: report[key] for key in ("metrics", "raw_metrics", "calibration", "selective", "conformal")}})
        print(f"{args.setting} {method} seed {seed}: acc {report['metrics']['accuracy']:.4f} "
              f"ece {report['metrics']['ece']:.4f} ({cost['seconds']:.0f} s)", flush=True)
    pool.shutdown()
    _write_table(args, recipe, ood, budget, grids, chosen, results, root)
    if args.archive:
        archive(root, args.archive / args.setting)


RECORD = ("cost.json", "recipe.yaml", "metrics.jsonl", "report/report.json")


def archive(root: Path, into: Path, only: str | None = None) -> None:
    """Each finished run's small record (RECORD) under `into` (of run `only`), and the setting's table and
    results."""
    import shutil

    for run in sorted(p for p in root.iterdir() if (p / "cost.json").exists() and only in (None, p.name)):
        for name in RECORD:
            if (run / name).exists():
                (into / run.name / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / name, into / run.name / name)
    for name in ("table.md", "results.json"):
        if (root / name).exists():
            shutil.copy2(root / name, into / name)


def _wait(job) -> tuple[dict | None, bool]:
    try:
        return job.result()
    except RuntimeError as error:
        print(str(error)[-2000:], file=sys.stderr, flush=True)
        return None, False


def _write_table(args, recipe, ood, budget, grids, chosen, results, root: Path) -> None:
    header = ["method", "lr", *[f"{label}{' (%)' if scale == 100 else ''}" for _, label, scale in ROWS + RAW_ROWS],
              "T", "AURC (entropy)", "90% LAC set size", "OOD AUROC entropy (%)", "OOD AUROC MI (%)", "seeds", "trainable (% of base)", "train time (s, median)",
              "peak RSS (GB)"]
    lines = [f"Setting `{args.setting}` — recipe `{recipe}`, budget `{args.budget}` {budget}, OOD `{ood}`, "
             f"seeds {args.seeds}, lr grids {({m: g for m, g in grids.items() if g})} chosen on validation; "
             f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        lr = chosen.get(method.split("-", 1)[0] if method not in METHODS else method, {}).get("train.lr")
        cells = [method, f"{lr:g}" if lr else "fixed"]
        cells += [mean_std([r["metrics"][key] for r in runs], scale) for key, _, scale in ROWS]
        cells += [mean_std([r.get("raw_metrics", r["metrics"])[key] for r in runs], scale) for key, _, scale in RAW_ROWS]
        cells.append(mean_std([r.get("calibration", {}).get("temperature", 1.0) for r in runs], 1))
        cells.append(mean_std([r["selective"]["entropy"]["aurc"] for r in runs], 1))
        cells.append(mean_std([r["conformal"]["0.9"]["lac"]["mean_set_size"] for r in runs], 1))
        cells.append(mean_std([r["ood"]["entropy"]["auroc"] for r in runs], 100))
        mi = [r["ood"]["mutual_information"]["auroc"] for r in runs if "mutual_information" in r["ood"]]
        cells.append(mean_std(mi, 100) if mi else "—")
        cells += [str(len(runs)), f"{100 * runs[0]['trainable_share']:.3f}",
                  f"{statistics.median(r['seconds'] for r in runs):.0f}", f"{max(r['peak_rss'] for r in runs) / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
