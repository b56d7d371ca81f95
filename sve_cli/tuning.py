"""Choosing and costing a run before it starts: `train.lr: auto` (a short validation sweep over
`lr_grid`) and `sve train --dry-run --time` (a few steps measured on this machine)."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sve_cli.errors import SveError
from sve_cli.distributed import Parallel
from sve_cli.vocabulary import METRIC
from sve_cli.recipe import Recipe
from sve_cli.checkpoint import read_json
from sve_cli.rundir import LR_SWEEP
from sve_cli.writing import write_json
from sve_cli.session import new_session, train_step, validation_numbers


def with_lr(recipe: Recipe, lr: float) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"lr": lr})})


def resolved_lr(recipe: Recipe, out: Path, resume: bool, parallel: Parallel,
                on_note: Callable[[str], None] | None) -> Recipe:
    """The recipe with `train.lr` a number: as written, or (`lr: auto`) the `lr_grid` value a short validation
    sweep chose. The sweep is kept in RUN/lr_sweep.json, so a resumed run does not sweep again; the run's
    recipe.yaml keeps `auto`."""
    if recipe.train.lr != "auto":
        return recipe
    record = out / LR_SWEEP
    if resume and record.exists():
        chosen = (read_json(record, "start the run again with --overwrite") or {}).get("chosen")
        if not isinstance(chosen, (int, float)) or not chosen > 0:
            raise SveError(f"{record} holds no chosen learning rate (an edited file); start the run again with --overwrite")
        if on_note and parallel.writer:
            on_note(f"lr auto: {chosen:g}, as the sweep in {record} chose")
        return with_lr(recipe, chosen)
    sweep = lr_sweep(recipe, parallel)
    if parallel.writer:
        write_json(record, sweep)
        if on_note:
            tried = "; ".join(f"{trial['lr']:g} → {trial['summary']}" for trial in sweep["trials"])
            on_note(f"lr auto: {len(sweep['trials'])} rates × {sweep['steps']} steps on {recipe.eval.split} "
                    f"({tried}): chose {sweep['chosen']:g} by {recipe.eval.metric} in {sweep['seconds'] / 60:.1f} min")
            best_nll = min(trial["nll"] for trial in sweep["trials"] if not trial.get("diverged"))
            if sweep["uniform_nll"] is not None and best_nll >= sweep["uniform_nll"]:
                on_note(f"lr auto: no rate predicts {recipe.eval.split} better than a uniform guess after "
                        f"{sweep['steps']} steps (best NLL {best_nll:.3f} ≥ {sweep['uniform_nll']:.3f}), so the choice "
                        f"is noise: raise train.lr_sweep_steps or set train.lr")
    return with_lr(recipe, sweep["chosen"])


def lr_sweep(recipe: Recipe, parallel: Parallel = Parallel()) -> dict:
    """`train.lr: auto`: train each `lr_grid` value from the same start for `lr_sweep_steps` steps (its own
    short warm-up and decay), score the validation split, keep the best by `eval.metric` (ties: lower NLL);
    a rate that diverges is out. Nothing is written. `uniform_nll` (ln of the classes; None for generation)
    is the NLL of a uniform guess: a sweep whose every rate is no better has not learned enough to choose
    (SmolLM2 at 12 steps a rate, docs/results.md §8)."""
    metric, started = recipe.eval.metric, time.perf_counter()
    higher = METRIC[metric].higher_is_better
    trials, steps = [], recipe.train.lr_sweep_steps
    for lr in recipe.train.lr_grid:
        session = new_session(with_lr(recipe, lr), Path(os.devnull), parallel, None)
        steps = steps or max(10, session.total // 5)
        session.total, session.warmup = steps, int(recipe.train.warmup_ratio * steps)
        try:
            while session.state["step"] < steps:
                train_step(session)
        except SveError:  # diverged: this rate is out
            trials.append({"lr": lr, "diverged": True, "summary": "diverged"})
            continue
        numbers = validation_numbers(session)
        trials.append({"lr": lr, metric: numbers[metric], "nll": numbers["nll"],
                       "summary": f"{METRIC[metric].label} {METRIC[metric].format(numbers[metric])}"})
    finite = [trial for trial in trials if not trial.get("diverged")]
    if not finite:
        raise SveError(f"lr auto: every rate of train.lr_grid {recipe.train.lr_grid} diverged; try smaller rates")
    best = max(finite, key=lambda t: ((t[metric] if higher else -t[metric]), -t["nll"]))
    classes = None if session.ensemble.head_kind == "tokens" else session.ensemble.head.weight.shape[1]
    return {"chosen": best["lr"], "metric": metric, "split": recipe.eval.split, "steps": steps, "trials": trials,
            "seconds": time.perf_counter() - started, "uniform_nll": math.log(classes) if classes else None}


def estimate_time(recipe: Recipe, steps: int = 3) -> dict:
    """`sve train --dry-run --time`: `steps` optimiser steps (the first a warm-up) and two evaluation batches
    measured on this machine, scaled to the whole run. Nothing is written (but the decomposition cache, when
    the recipe's model has none yet)."""
    auto = recipe.train.lr == "auto"
    session = new_session(with_lr(recipe, recipe.train.lr_grid[0]) if auto else recipe, Path(os.devnull), Parallel(), None)
    seconds = []
    for _ in range(max(2, steps)):
        started = time.perf_counter()
        train_step(session)
        seconds.append(time.perf_counter() - started)
    per_step = statistics.median(seconds[1:])
    rows = torch.arange(min(len(session.eval_data), recipe.eval.batch_size))
    batch = {k: v.to(session.device) for k, v in session.eval_data.batch(rows).items()}
    session.ensemble.eval()
    with torch.no_grad():
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            session.ensemble(**batch)
            timings.append(time.perf_counter() - started)
    per_row = statistics.median(timings[1:]) / len(rows)
    if recipe.eval.metric == "rouge_l":  # answering the validation prompts: a batch of them, timed
        from sve_cli.answers import answer_quality

        started, answered = time.perf_counter(), min(len(session.eval_examples), 8)
        answer_quality(session.ensemble, session.pipeline, session.eval_examples, answered)
        per_row += (time.perf_counter() - started) / answered
    every = recipe.train.eval_every_steps or session.steps_per_epoch
    evaluations = sum(1 for step in range(1, session.total + 1) if step % every == 0 or step == session.total)
    train_seconds, eval_seconds = per_step * session.total, evaluations * per_row * len(session.eval_data)
    sweep_seconds = 0.0
    if auto:  # every grid value trains its sweep steps and scores the validation split once
        sweep_steps = recipe.train.lr_sweep_steps or max(10, session.total // 5)
        sweep_seconds = len(recipe.train.lr_grid) * (per_step * sweep_steps + per_row * len(session.eval_data))
    return {"seconds_per_step": per_step, "steps": session.total, "train_seconds": train_seconds,
            "evaluations": evaluations, "evaluation_rows": len(session.eval_data), "evaluation_seconds": eval_seconds,
            "sweep_seconds": sweep_seconds, "total_seconds": train_seconds + eval_seconds + sweep_seconds}
