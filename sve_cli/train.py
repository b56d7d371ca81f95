"""`sve train`: joint M-member fine-tuning from a recipe. Reads top to bottom like a script.

The run directory's files are listed in `sve_cli.rundir`. Every file is written atomically; a run killed at any moment and resumed ends with
the same result as an uninterrupted one (CPU, fixed seed).

Data parallel: under `torchrun`, each rank takes an equal slice of every global batch, gradients
are averaged by DDP, validation logits are gathered, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from sve_cli.bank import bank_tensors, save_bank
from sve_cli.data import load_splits
from sve_cli.ensemble import SVEModel
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.distributed import (Parallel, any_rank, average, barrier, full, gradient_sync, init_parallel, like, settle,
                                 wrap)
from sve_cli.inference import member_chunks, predict
from sve_cli.vocabulary import METRIC, VALIDATION_METRICS
from sve_cli.metrics import Prediction, calibration_metrics, fit_calibration, target_metrics, temperature_of
from sve_cli.pipeline import Encoded, Pipeline
from sve_cli.schedule import MemberOrders, lr_factor, param_groups
from sve_cli.recipe import Recipe
from sve_cli.outputs import refuse_inputs, refuse_unusual
from sve_cli.checkpoint import read_json
from sve_cli.rundir import (BANK, CHECKPOINT, LR_SWEEP, METRICS, STATE, check_reuse, is_run_directory, is_stub, remove_stub,
                            start_fresh)
from sve_cli.writing import atomic_path, exclusive, fault_point, save_safetensors, visible_entries, write_json



def _prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, parallel: Parallel,
                     on_note: Callable[[str], None] | None) -> bool:
    """Returns True when an existing checkpoint should be resumed. Rank 0 holds the run's lock."""
    resuming = check_reuse(out, recipe, resume, overwrite, on_note if parallel.writer else None)
    barrier(parallel)  # every rank has looked at `out` before rank 0 writes into it
    if parallel.writer and not resuming:
        start_fresh(out, recipe)
    return resuming


def _diverged(step: int, recipe: Recipe, what: str, out: Path) -> SveError:
    """The one line a diverging run stops with; what is on disk is the last good checkpoint and bank."""
    rates = ", ".join(f"{key} {value:g}" for key, value in (("train.lr", recipe.train.lr),
                                                          ("train.sigma_lr", recipe.train.sigma_lr)) if value)
    kept = f"; {out} keeps its last good checkpoint and bank" if (out / CHECKPOINT).exists() else ""
    return SveError(f"training diverged at step {step}: {what}; lower the learning rate ({rates}){kept}")


def _save_checkpoint(session: "Session") -> None:
    """Trainable state, AdamW moments, RNG and step, whole (gathered from every rank of a sharded model),
    written by rank 0: the file one process writes, which resumes on any number of ranks."""
    model, optimizer, state = session.ensemble, session.optimizer, session.state
    settle(model, session.parallel)
    names = {id(p): n for n, p in model.trainable_parameters().items()}
    tensors = {f"param.{n}": full(p.detach()) for n, p in model.trainable_parameters().items()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"optim.{names[id(parameter)]}.{key}"] = full(value.detach())
    tensors["rng.torch"] = torch.get_rng_state()
    if session.parallel.writer:
        fault_point("checkpoint-write")
        save_safetensors(session.out / CHECKPOINT, tensors, {"sve.trainer_state": json.dumps(state)})
        write_json(session.out / STATE, state)


def _load_checkpoint(out: Path, model: SVEModel, optimizer: torch.optim.Optimizer) -> dict:
    trainable = model.trainable_parameters()
    try:
        with safe_open(str(out / CHECKPOINT), framework="pt") as handle:
            state = json.loads(handle.metadata()["sve.trainer_state"])
            with torch.no_grad():
                for name, parameter in trainable.items():
                    stored = handle.get_tensor(f"param.{name}")
                    if stored.shape != parameter.shape or not bool(torch.isfinite(stored).all()):
                        raise ValueError(f"'{name}' has another shape or values that are not finite")
                    parameter.copy_(like(parameter, stored))
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    name = next(n for n, p in trainable.items() if p is parameter)
                    keys = [k for k in handle.keys() if k.startswith(f"optim.{name}.")]
                    optimizer.state[parameter] = {k.rsplit(".", 1)[1]: like(parameter, handle.get_tensor(k))
                                                  if handle.get_slice(k).get_shape() == list(parameter.shape)
                                                  else handle.get_tensor(k) for k in keys}
            torch.set_rng_state(handle.get_tensor("rng.torch"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:  # a damaged file
        raise SveError(f"--resume: {out / CHECKPOINT} is damaged ({str(error).splitlines()[0][:200]}); "
                       "start the run again with --overwrite") from None
    return state


class Listener:
    """Receives a run's events: `on_step(info)` after every optimiser step, `on_eval(line)` after every
    evaluation, `close()` at the end (the progress line, TensorBoard)."""

    def on_step(self, info: dict) -> None:
        pass

    def on_eval(self, line: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Callbacks(Listener):
    """The caller's `on_step` / `on_eval` functions (e.g. the CLI's progress line)."""

    def __init__(self, on_step: Callable[[dict], None] | None, on_eval: Callable[[dict], None] | None):
        self.step_function, self.eval_function = on_step, on_eval

    def on_step(self, info: dict) -> None:
        if self.step_function:
            self.step_function(info)

    def on_eval(self, line: dict) -> None:
        if self.eval_function:
            self.eval_function(line)


class TensorBoard(Listener):
    """Loss, member accuracy, learning rates and validation metrics in RUN/tensorboard; a resumed run drops
    the events logged after its checkpoint (`purge_step`), so curves match an uninterrupted run."""

    def __init__(self, out: Path, split: str, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SveError("train.log_tensorboard needs the tensorboard package: "
                           "pip install 'sve-cli[tensorboard]'") from None
        self.writer, self.split = SummaryWriter(str(out / "tensorboard"), purge_step=step or None), split

    def on_step(self, info: dict) -> None:
        self.writer.add_scalar("train/loss", info["loss"], info["step"])
        self.writer.add_scalar("train/member_accuracy", info["accuracy"], info["step"])
        for name, lr in info["learning_rates"].items():
            self.writer.add_scalar(f"lr/{name}", lr, info["step"])

    def on_eval(self, line: dict) -> None:
        for key in (*VALIDATION_METRICS, "disagreement"):
            if key in line:  # generation measures accuracy and NLL only
                self.writer.add_scalar(f"{self.split}/{key}", line[key], line["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard(session: "Session") -> list[Listener]:
    recipe = session.recipe
    if not (recipe.train.log_tensorboard and session.parallel.writer):
        return []
    return [TensorBoard(session.out, recipe.eval.split, session.state["step"])]


def _write_metrics(out: Path, history: list[dict]) -> None:
    with atomic_path(out / METRICS) as temporary:
        temporary.write_text("".join(json.dumps(line) + "\n" for line in history), encoding="utf-8")


def train(recipe: Recipe, out: Path, resume: bool = False, overwrite: bool = False,
          on_step: Callable[[dict], None] | None = None, on_eval: Callable[[dict], None] | None = None,
          on_note: Callable[[str], None] | None = None) -> dict:
    """Train `recipe` into the run directory `out`; returns the final trainer state.

    Another `sve train` writing into `out` is refused at once (its lock is held); `on_note(text)`
    receives remarks worth a line (e.g. a resume that starts from step 0).
    """
    refuse_unusual(out, directory=True)
    training_device(recipe.train.device)  # a GPU recipe on a machine without one: refused before anything
    if out.exists() and visible_entries(out) and not is_run_directory(out):  # before its lock is created there
        raise OutputExistsError(f"{out} holds files that are not an sve run; sve never writes there: "
                                "choose another --out")
    refuse_inputs(out, [recipe.model.path if Path(recipe.model.path).exists() else None,
                        recipe.model.decomposition, *recipe.task.local_paths])
    parallel = init_parallel(recipe.train.parallelism)
    created = not out.exists()
    lock = exclusive(out, "train", wait=False) if parallel.writer else contextlib.nullcontext()
    with lock:  # refused at once while another sve train holds it: then nothing here is ours to clean up
        try:
            return _train(recipe, out, resume, overwrite, parallel, [Callbacks(on_step, on_eval)], on_note)
        except (Exception, KeyboardInterrupt):
            if parallel.writer and is_stub(out):  # failed before its first checkpoint: nothing worth keeping
                remove_stub(out, created)
            raise


def interrupted_message(recipe: Path, out: Path, overrides: list[str]) -> str:
    """What an interrupted `sve train` says: where `--resume` would continue from."""
    try:
        step = json.loads((out / STATE).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "interrupted before the first checkpoint: nothing was kept; run the command again to start over"
    sets = "".join(f" --set {item}" for item in overrides)
    return f"interrupted; `sve train {recipe} --out {out}{sets} --resume` continues from step {step}"


@dataclass
class Session:
    """A run between two steps: the model, its optimiser and data, the step plan, and the trainer state."""

    recipe: Recipe
    out: Path
    parallel: Parallel
    model: torch.nn.Module  # the ensemble, wrapped by DDP under torchrun
    ensemble: SVEModel
    optimizer: torch.optim.Optimizer
    train_data: Encoded
    eval_data: Encoded
    pipeline: Pipeline  # with the validation examples, what `eval.metric: rouge_l` answers
    eval_examples: object
    orders: MemberOrders
    device: torch.device
    batches_per_epoch: int
    steps_per_epoch: int
    total: int
    warmup: int
    state: dict
    bank_extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    tokens_seen: float = 0.0
    last_loss: float = math.nan

    @property
    def due_for_evaluation(self) -> bool:
        step = self.state["step"]
        return step % (self.recipe.train.eval_every_steps or self.steps_per_epoch) == 0 or step == self.total


def _train(recipe: Recipe, out: Path, resume: bool, overwrite: bool, parallel: Parallel,
           listeners: list, on_note: Callable[[str], None] | None) -> dict:
    """Set up, then one optimiser step at a time: evaluate and keep the best bank when due, checkpoint."""
    session = _setup(recipe, out, resume, overwrite, parallel, on_note)
    listeners = listeners + _tensorboard(session)
    while session.state["step"] < session.total:
        info = _step(session)
        for listener in listeners:
            listener.on_step(info)
        if session.due_for_evaluation:
            line = _evaluate_and_keep_best(session)
            for listener in listeners:
                listener.on_eval(line)
        elif session.state["step"] % recipe.train.checkpoint_every_steps == 0:
            _save_checkpoint(session)
    for listener in listeners:
        listener.close()
    barrier(parallel)
    return session.state


def _setup(recipe: Recipe, out: Path, resume: bool, overwrite: bool, parallel: Parallel,
           on_note: Callable[[str], None] | None) -> Session:
    """The run directory, data, model, optimiser and step plan (restored from a checkpoint when resuming)."""
    resuming = _prepare_run_dir(out, recipe, resume, overwrite, parallel, on_note)
    recipe = resolved_lr(recipe, out, resume, parallel, on_note)
    session = _session(recipe, out, parallel, on_note)
    if resuming:
        session.state = _load_checkpoint(out, session.ensemble, session.optimizer)
    return session


def _session(recipe: Recipe, out: Path, parallel: Parallel, on_note: Callable[[str], None] | None) -> Session:
    """Data, model, optimiser and step plan of a fresh run (nothing is written)."""
    config = recipe.train
    torch.manual_seed(config.seed)
    pipeline = Pipeline(recipe)
    splits, label_names = load_splits(recipe.task, recipe.task.dataset_name)
    if parallel.writer and on_note:
        for note in pipeline.data_notes(splits, label_names):
            on_note(note)
    ensemble = pipeline.build_model(label_names)
    device = torch.device(training_device(config.device))
    if config.gradient_checkpointing:
        ensemble.enable_gradient_checkpointing()
    if config.precision == "bf16" and device.type == "cuda":
        ensemble.use_low_precision(torch.bfloat16)
    ensemble.to(device)
    train_data = pipeline.encode(splits[recipe.task.train_split])  # the test split is never needed here
    eval_data = pipeline.encode(splits[recipe.eval.split])
    if recipe.eval.metric == "rouge_l" and parallel.world > 1:
        raise SveError("eval.metric: rouge_l answers the validation prompts in one process: run without --nproc, "
                       "or validate by nll")
    if config.batch_size % parallel.world:
        raise SveError(f"train.batch_size {config.batch_size} is not divisible by {parallel.world} processes")
    batches_per_epoch = len(train_data) // config.batch_size
    if batches_per_epoch < config.gradient_accumulation:
        raise SveError(f"{len(train_data)} training examples are fewer than one step "
                       f"(train.batch_size × train.gradient_accumulation)")
    steps_per_epoch = batches_per_epoch // config.gradient_accumulation
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    model = wrap(ensemble, parallel)  # DDP, or sharded by FSDP in place (before the optimiser sees the parameters)
    optimizer = torch.optim.AdamW(param_groups(ensemble, recipe))
    state = {"step": 0, "total_steps": total, "best": None, "best_step": None, "history": [],
             "finished": False, "label_names": label_names}
    model.train()
    return Session(recipe, out, parallel, model, ensemble, optimizer, train_data, eval_data, pipeline,
                   splits[recipe.eval.split], MemberOrders(len(train_data), ensemble.members, config.seed, config.member_batches), device,
                   batches_per_epoch, steps_per_epoch, total, int(config.warmup_ratio * total), state,
                   {"label_names": label_names, "task": recipe.task.type, "letters": pipeline.letters,
                    "recipe": recipe.model_dump(mode="json")})  # a bank alone can be predicted with


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
    return with_lr(recipe, sweep["chosen"])


def lr_sweep(recipe: Recipe, parallel: Parallel = Parallel()) -> dict:
    """`train.lr: auto`: train each `lr_grid` value from the same start for `lr_sweep_steps` steps (its own
    short warm-up and decay), score the validation split, keep the best by `eval.metric` (ties: lower NLL);
    a rate that diverges is out. Nothing is written."""
    metric, started = recipe.eval.metric, time.perf_counter()
    higher = METRIC[metric].higher_is_better
    trials, steps = [], recipe.train.lr_sweep_steps
    for lr in recipe.train.lr_grid:
        session = _session(with_lr(recipe, lr), Path(os.devnull), parallel, None)
        steps = steps or max(10, session.total // 5)
        session.total, session.warmup = steps, int(recipe.train.warmup_ratio * steps)
        try:
            while session.state["step"] < steps:
                _step(session)
        except SveError:  # diverged: this rate is out
            trials.append({"lr": lr, "diverged": True, "summary": "diverged"})
            continue
        numbers = _validation_numbers(session)
        trials.append({"lr": lr, metric: numbers[metric], "nll": numbers["nll"],
                       "summary": f"{METRIC[metric].label} {METRIC[metric].format(numbers[metric])}"})
    finite = [trial for trial in trials if not trial.get("diverged")]
    if not finite:
        raise SveError(f"lr auto: every rate of train.lr_grid {recipe.train.lr_grid} diverged; try smaller rates")
    best = max(finite, key=lambda t: ((t[metric] if higher else -t[metric]), -t["nll"]))
    return {"chosen": best["lr"], "metric": metric, "split": recipe.eval.split, "steps": steps, "trials": trials,
            "seconds": time.perf_counter() - started}


def _validation_numbers(session: "Session") -> dict:
    """The session's ensemble scored on its validation split: accuracy, NLL, Brier, ECE (raw), or for
    generation the target tokens' accuracy and NLL (and, `eval.metric: rouge_l`, the greedy answers' ROUGE-L)."""
    recipe = session.recipe
    logits = predict(session.ensemble, session.eval_data, recipe.eval.batch_size, session.parallel,
                     members_per_pass=recipe.train.members_per_pass, budget=recipe.eval.cache_budget)
    if session.ensemble.head_kind == "tokens":
        if recipe.eval.metric != "rouge_l":
            return target_metrics(logits)
        from sve_cli.answers import answer_quality

        return {**target_metrics(logits), "rouge_l": answer_quality(session.ensemble, session.pipeline,
                                                                    session.eval_examples)}
    return calibration_metrics(Prediction.of(logits, recipe.eval.combine), session.eval_data.labels, recipe.eval.bins)


def training_device(asked: str) -> str:
    """`train.device` on this machine: cuda refused without a GPU (one line saying how to run it here)."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise SveError("this recipe is meant for a GPU (train.device: cuda) and this machine has none: "
                       "`--set train.device=cpu` runs it here anyway (`--dry-run --device cpu` says whether it fits)")
    return asked if asked != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def estimate_time(recipe: Recipe, steps: int = 3) -> dict:
    """`sve train --dry-run --time`: `steps` optimiser steps (the first a warm-up) and two evaluation batches
    measured on this machine, scaled to the whole run. Nothing is written (but the decomposition cache, when
    the recipe's model has none yet)."""
    auto = recipe.train.lr == "auto"
    session = _session(with_lr(recipe, recipe.train.lr_grid[0]) if auto else recipe, Path(os.devnull), Parallel(), None)
    seconds = []
    for _ in range(max(2, steps)):
        started = time.perf_counter()
        _step(session)
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


def _step(session: Session) -> dict:
    """One optimiser step: every micro-batch and member chunk forward and backward (gradients averaged over
    ranks once, on the last backward), clipping, AdamW; returns what the progress line shows."""
    config, ensemble, data = session.recipe.train, session.ensemble, session.train_data
    step, parallel = session.state["step"], session.parallel
    for group in session.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, session.total, session.warmup, config.schedule)
    session.optimizer.zero_grad(set_to_none=True)
    shared = config.member_batches == "shared"
    chunks = member_chunks(ensemble.members, config.members_per_pass)
    passes = [(micro, chunk) for micro in range(config.gradient_accumulation) for chunk in chunks]
    loss_sum, correct, rows_seen = 0.0, 0.0, 0
    for index, (micro, (start, stop)) in enumerate(passes):
        epoch, offset = divmod(step * config.gradient_accumulation + micro, session.batches_per_epoch)
        member_rows = [rows[parallel.rank::parallel.world]  # each member's rows of this batch
                       for rows in session.orders.batch(epoch, offset, config.batch_size)]
        # one batch that the model repeats for every member, or each member's own rows, member-major
        rows = member_rows[0] if shared else torch.cat(member_rows[start:stop])  # [b] or [m·b]
        batch = {k: v.to(session.device) for k, v in data.batch(rows).items()}
        sync = gradient_sync(session.model, parallel, index == len(passes) - 1)  # reduced once per step
        with sync, ensemble.active_members(start, stop):  # also around backward: checkpointing recomputes
            logits = session.model(member_major=not shared, **batch)  # [b, m, C] (generation: [N, m, V])
            members, classes = logits.shape[1:]
            if "target_ids" in batch:  # generation: every target token is one example
                labels = batch["target_ids"][batch["target_ids"] != -100][:, None]  # [N, 1]
            else:
                labels = data.labels[rows].to(session.device).reshape(-1, len(member_rows[0])).T  # [b, 1] or [b, m]
            labels = labels.expand(-1, members)  # [b, m]
            loss = torch.nn.functional.cross_entropy(  # mean over rows and this chunk's members
                logits.float().reshape(-1, classes), labels.reshape(-1))
            if any_rank(not torch.isfinite(loss), parallel):  # every rank stops together
                raise _diverged(step + 1, session.recipe, f"the loss is {float(loss)}", session.out)
            share = members / ensemble.members / config.gradient_accumulation
            (loss * share).backward()
        loss_sum += float(loss.detach()) * share
        correct += float((logits.argmax(-1) == labels).float().mean(1).sum()) * members / ensemble.members
        if stop == ensemble.members:  # the micro-batch's last chunk
            rows_seen += len(labels)  # its rows (generation: its target tokens)
            session.tokens_seen += sum(data.tokens(r) for r in member_rows) / len(member_rows)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(ensemble.trainable_parameters().values(), config.grad_clip)
    session.optimizer.step()
    finite = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in ensemble.trainable_parameters().values())
    if any_rank(not finite, parallel):
        raise _diverged(step + 1, session.recipe, "a trained value is no longer finite", session.out)
    session.state["step"] = step = step + 1
    loss_sum, accuracy = average([loss_sum, correct / max(1, rows_seen)], parallel)  # over every rank's rows
    session.last_loss = loss_sum
    elapsed = max(time.perf_counter() - session.started, 1e-9)
    return {"step": step, "total": session.total, "loss": loss_sum, "accuracy": accuracy,
            "tokens_per_second": session.tokens_seen * parallel.world / elapsed, "epoch": step / session.steps_per_epoch,
            "learning_rates": {group["name"]: group["lr"] for group in session.optimizer.param_groups}}


def _evaluate_and_keep_best(session: Session) -> dict:
    """Score the validation split and fit its temperature (eval.calibration); write the bank, with that
    temperature, when the metric improved; then metrics and checkpoint."""
    recipe, state, parallel = session.recipe, session.state, session.parallel
    if session.ensemble.head_kind == "tokens":  # generation: the target tokens' accuracy and NLL, uncalibrated
        numbers, calibration = _validation_numbers(session), {"method": "none", "why": "generation"}
    else:
        logits = predict(session.ensemble, session.eval_data, recipe.eval.batch_size, parallel,
                         members_per_pass=recipe.train.members_per_pass, budget=recipe.eval.cache_budget)
        labels = session.eval_data.labels
        numbers = calibration_metrics(Prediction.of(logits, recipe.eval.combine), labels, recipe.eval.bins)
        calibration = ({**fit_calibration(logits, labels, recipe.eval.combine), "split": recipe.eval.split}
                       if recipe.eval.calibration == "temperature" else {"method": "none"})
    step = state["step"]
    line = {"step": step, "epoch": round(step / session.steps_per_epoch, 4), "split": recipe.eval.split,
            "train_loss": session.last_loss, **numbers, "temperature": temperature_of(calibration)}
    state["history"].append(line)
    metric, value = recipe.eval.metric, numbers[recipe.eval.metric]
    higher = METRIC[metric].higher_is_better
    if state["best"] is None or (value > state["best"] if higher else value < state["best"]):
        state["best"], state["best_step"] = value, step
        settle(session.ensemble, parallel)
        tensors = bank_tensors(session.ensemble)  # gathered by every rank of a sharded model
        if parallel.writer:
            save_bank(session.ensemble, session.out / BANK,
                      {**session.bank_extra, "step": step, metric: value, "calibration": calibration}, tensors)
    state["finished"] = step == session.total
    if parallel.writer:
        _write_metrics(session.out, state["history"])
    _save_checkpoint(session)
    return line
