"""Uncertainty of generated text: SVE (M=4) against SVF and a single fine-tuned model, BBC headlines.

Each run trains `recipes/smollm2_bbc_headlines.yaml` (SmolLM2-135M, an article's first 60 words -> its
title, the upper third of the blocks targeted) with one method and seed, then `sve evaluate` answers the
test split greedily and scores each uncertainty score by PRR and AUROC for wrong answers
(sve_cli/answers.py). The table gives mean ± std over seeds; the last lines compare SVE's best score
(MI or an entropy) with the best single-model score (sequence NLL, per-token NLL, mean token entropy)
of the single fine-tuned model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/headlines.py --seeds 0 1 2 --parallel 2 \\
        --out /work/runs/headlines --archive benchmarks/results/headlines

Resumable: a run whose report exists is skipped, one with a checkpoint is resumed (`sve train --resume`).
Each method's learning rate is chosen at the first seed from its grid (`--lr-grid` for SVE and SVF,
`--single-lrs` for the single model) by `--select`: `rouge_l`, the mean ROUGE-L of the run's greedy answers
to the validation prompts (what `eval.metric: rouge_l` measures; kept in RUN/validation_answers.json), or
`nll`, the validation token NLL `sve train` logs. Only the chosen rate's run is evaluated on the test split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/headlines.py --seeds 0 1 2 --lr-grid 3e-2 1e-1 3e-1 \
        --select rouge_l --parallel 2 --out /work/runs/headlines --archive benchmarks/results/headlines
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sve_cli" / "recipes" / "smollm2_bbc_headlines.yaml"
METHODS = {"sve": ["ensemble.method=sve", "ensemble.members=4"],
           "svf": ["ensemble.method=svf", "ensemble.members=1"],
           "single": ["ensemble.method=single", "ensemble.members=1"]}
ABLATIONS = {"sve-init0.1": ["ensemble.method=sve", "ensemble.members=4", "ensemble.sigma_init=0.1"],  # diversity
             "sve-M8": ["ensemble.method=sve", "ensemble.members=8"],
             # capacity: the MLP of the same blocks as well (the prefix below stays shared)
             "sve-all": ["ensemble.method=sve", "ensemble.members=4", "ensemble.targets=all@20-"]}
SINGLE_MODEL_SCORES = ("nll", "nll_per_token", "entropy_mean")  # what a user of one model has
ENSEMBLE_SCORES = ("mutual_information", "entropy_mean", "entropy_max", "expected_entropy")
ARCHIVED = ("recipe.yaml", "metrics.jsonl", "cost.json", "report/report.json", "validation_answers.json")
VALIDATION = "validation_answers.json"


def sve(*args: str) -> None:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "sve"), *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"sve {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def run_one(out: Path, method: str, lr: float, seed: int, archive: Path | None, evaluate: bool = True) -> Path:
    """Train (or resume) and (`evaluate`) evaluate one run on the test split; skip what is there."""
    report = out / "report" / "report.json"
    if report.exists() and "scores" in json.loads(report.read_text()):
        return out
    if not evaluate and (out / "trainer_state.json").exists() \
            and json.loads((out / "trainer_state.json").read_text())["finished"]:
        return out
    overrides = [*{**METHODS, **ABLATIONS}[method], f"train.lr={lr}", f"train.seed={seed}"]
    sets = [item for override in overrides for item in ("--set", override)]
    started = time.perf_counter()
    if not (out / "trainer_state.json").exists() or not json.loads((out / "trainer_state.json").read_text())["finished"]:
        resume = ["--resume"] if (out / "checkpoint.safetensors").exists() else ["--overwrite"]
        sve("train", str(RECIPE), "--out", str(out), *sets, *resume)
    trained = time.perf_counter()
    if evaluate:
        sve("evaluate", str(out), "--overwrite")
    cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").exists() else {}
    if trained - started > 1:  # (a resumed, already trained run keeps its training time)
        cost["train_seconds"] = trained - started
    if evaluate:
        cost["evaluate_seconds"] = time.perf_counter() - trained
    (out / "cost.json").write_text(json.dumps(cost))
    keep(out, archive)
    return out


def keep(out: Path, archive: Path | None) -> None:
    """Copy the run's small record (ARCHIVED) to `archive`/RUN."""
    if archive is not None:
        for name in ARCHIVED:
            if (out / name).exists():
                (archive / out.name / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(out / name, archive / out.name / name)


def validation_rouge(out: Path, archive: Path | None) -> float:
    """The mean ROUGE-L of the run's greedy answers to its validation prompts (answered once, in a process
    of its own, and kept in RUN/validation_answers.json)."""
    record = out / VALIDATION
    if not record.exists():
        result = subprocess.run([sys.executable, __file__, "--answer-validation", str(out)], capture_output=True,
                                text=True, cwd=REPO)
        if result.returncode:
            raise RuntimeError(f"answering {out}'s validation prompts failed:\n{result.stderr[-3000:]}")
        keep(out, archive)
    return json.loads(record.read_text())["rouge_l"]


def answer_validation(out: Path) -> None:
    from sve_cli.answers import answer_quality
    from sve_cli.data import load_splits
    from sve_cli.pipeline import load_ensemble
    from sve_cli.rundir import RECIPE, open_run

    started = time.perf_counter()
    recipe, bank = open_run(out)
    pipeline, model, _ = load_ensemble(recipe, bank)
    examples = load_splits(recipe.task, str(out / RECIPE))[0][recipe.eval.split]
    value = answer_quality(model, pipeline, examples)
    (out / VALIDATION).write_text(json.dumps({"rouge_l": value, "examples": len(examples), "split": recipe.eval.split,
                                              "seconds": time.perf_counter() - started}))


def validation_nll(out: Path) -> float:
    return min(json.loads(line)["nll"] for line in (out / "metrics.jsonl").read_text().splitlines())


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: dict[str, list[Path]]) -> str:
    reports = {method: [json.loads((run / "report" / "report.json").read_text()) for run in paths]
               for method, paths in runs.items()}
    methods = list(reports)
    lines = ["| | " + " | ".join(f"{m} (n={len(reports[m])})" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    lines.append("| ROUGE-L (%) | " + " | ".join(mean_std([r["rouge_l"] for r in reports[m]], 100, 2) for m in methods) + " |")
    lines.append("| wrong (ROUGE-L < 0.3) (%) | " + " | ".join(mean_std([r["wrong_share"] for r in reports[m]], 100, 1)
                                                          for m in methods) + " |")
    scores = [name for name in ("nll", "nll_per_token", "entropy_mean", "entropy_max", "expected_entropy",
                                "mutual_information")]
    for key, label, scale, digits in (("prr", "PRR", 1, 3), ("auroc_wrong", "AUROC wrong (%)", 100, 1)):
        for name in scores:
            lines.append(f"| {label} {name} | " + " | ".join(
                mean_std([r["scores"].get(name, {}).get(key) for r in reports[m]], scale, digits) for m in methods) + " |")
    if "sve" in reports and "single" in reports:
        best_sve = max(ENSEMBLE_SCORES, key=lambda s: statistics.mean(r["scores"][s]["prr"] for r in reports["sve"]))
        best_single = max(SINGLE_MODEL_SCORES,
                          key=lambda s: statistics.mean(r["scores"][s]["prr"] for r in reports["single"]))
        lines += ["", f"SVE's best score: {best_sve}, PRR {mean_std([r['scores'][best_sve]['prr'] for r in reports['sve']])}; "
                  f"the single model's best: {best_single}, PRR "
                  f"{mean_std([r['scores'][best_single]['prr'] for r in reports['single']])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answer-validation", type=Path, help=argparse.SUPPRESS)  # the worker of validation_rouge
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ablate", nargs="+", default=[], choices=list(ABLATIONS),
                        help="SVE with one thing changed, at the first seed and SVE's lr")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[3e-2], help="SVE's and SVF's learning rates")
    parser.add_argument("--single-lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--select", choices=["rouge_l", "nll"], default="rouge_l",
                        help="what chooses each method's rate on validation (first seed)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "headlines")
    parser.add_argument("--archive", type=Path, default=None)
    args = parser.parse_args()
    if args.answer_validation:
        answer_validation(args.answer_validation)
        return
    args.out.mkdir(parents=True, exist_ok=True)

    def path(method: str, lr: float, seed: int) -> Path:
        return args.out / f"{method}-lr{lr:g}-seed{seed}"

    grids = {m: args.single_lrs if m == "single" else args.lr_grid for m in args.methods}
    first = args.seeds[0]
    with ThreadPoolExecutor(args.parallel) as pool:
        # 1. every rate of every grid at the first seed: trained, and (rouge_l) its validation prompts answered
        jobs = [(m, lr, first) for m in args.methods for lr in grids[m]]
        single_rate = all(len(grids[m]) == 1 for m in args.methods)  # nothing to choose: evaluate right away

        def trained(job):
            out = run_one(path(*job), *job, args.archive, evaluate=single_rate)
            return validation_rouge(out, args.archive) if args.select == "rouge_l" and len(grids[job[0]]) > 1 else None

        list(pool.map(trained, jobs))
        chosen = {}
        for m in args.methods:
            scores = {lr: (validation_rouge(path(m, lr, first), args.archive) if args.select == "rouge_l"
                           else -validation_nll(path(m, lr, first))) for lr in grids[m]} if len(grids[m]) > 1 else {}
            chosen[m] = max(scores, key=scores.get) if scores else grids[m][0]
            if scores:
                print(f"{m}: validation {'answers ROUGE-L' if args.select == 'rouge_l' else 'token NLL'} by lr: "
                      + ", ".join(f"{lr:g} {abs(value):.4f}" for lr, value in scores.items()) + f" -> {chosen[m]:g}",
                      flush=True)
        # 2. the chosen rates at every seed, evaluated on the test split; the ablations at SVE's chosen rate
        rest = [(m, chosen[m], seed) for seed in args.seeds for m in args.methods]
        rest += [(name, chosen.get("sve", args.lr_grid[0]), first) for name in args.ablate]
        list(pool.map(lambda job: run_one(path(*job), *job, args.archive), rest))
    runs = {m: [path(m, chosen[m], seed) for seed in args.seeds] for m in args.methods}
    runs.update({name: [path(name, chosen.get("sve", args.lr_grid[0]), first)] for name in args.ablate})
    text = table(runs)
    (args.out / "table.md").write_text(text)
    if args.archive is not None:
        (args.archive / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
