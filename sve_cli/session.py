"""A training session between two optimiser steps: the model, its optimiser and data, the step plan and
the trainer state (`new_session`); one optimiser step (`train_step`); the validation numbers
(`validation_numbers`). `sve_cli.train` runs sessions into a run directory; `sve_cli.tuning` runs short
ones for `lr: auto` and `--dry-run --time`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sve_cli.data import Examples, load_splits
from sve_cli.ensemble import SVEModel
from sve_cli.errors import SveError
from sve_cli.distributed import Parallel, any_rank, average, gradient_sync, wrap
from sve_cli.inference import member_chunks, predict
from sve_cli.metrics import Prediction, calibration_metrics, target_metrics
from sve_cli.pipeline import Encoded, Pipeline
from sve_cli.schedule import MemberOrders, lr_factor, param_groups
from sve_cli.recipe import Recipe
from sve_cli.rundir import CHECKPOINT


def diverged(step: int, recipe: Recipe, what: str, out: Path) -> SveError:
    """The one line a diverging run stops with; what is on disk is the last good checkpoint and bank."""
    rates = ", ".join(f"{key} {value:g}" for key, value in (("train.lr", recipe.train.lr),
                                                          ("train.sigma_lr", recipe.train.sigma_lr)) if value)
    kept = f"; {out} keeps its last good checkpoint and bank" if (out / CHECKPOINT).exists() else ""
    return SveError(f"training diverged at step {step}: {what}; lower the learning rate ({rates}){kept}")


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
    eval_examples: Examples
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


def new_session(recipe: Recipe, out: Path, parallel: Parallel, on_note: Callable[[str], None] | None) -> Session:
    """Data, model, optimiser and step plan of a fresh run (nothing is written)."""
    config = recipe.train
    if recipe.eval.metric == "rouge_l" and parallel.world > 1:
        raise SveError("eval.metric: rouge_l answers the validation prompts in one process: run without --nproc, "
                       "or validate by nll")
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
    orders = MemberOrders(len(train_data), ensemble.members, config.seed, config.member_batches)
    return Session(recipe, out, parallel, model, ensemble, optimizer, train_data, eval_data, pipeline,
                   splits[recipe.eval.split], orders, device, batches_per_epoch, steps_per_epoch, total,
                   int(config.warmup_ratio * total), state,
                   {"label_names": label_names, "task": recipe.task.type, "letters": pipeline.letters,
                    "recipe": recipe.model_dump(mode="json")})  # a bank alone can be predicted with


def train_step(session: Session) -> dict:
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
                raise diverged(step + 1, session.recipe, f"the loss is {float(loss.detach())}", session.out)
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
        raise diverged(step + 1, session.recipe, "a trained value is no longer finite", session.out)
    session.state["step"] = step = step + 1
    loss_sum, accuracy = average([loss_sum, correct / max(1, rows_seen)], parallel)  # over every rank's rows
    session.last_loss = loss_sum
    elapsed = max(time.perf_counter() - session.started, 1e-9)
    return {"step": step, "total": session.total, "loss": loss_sum, "accuracy": accuracy,
            "tokens_per_second": session.tokens_seen * parallel.world / elapsed, "epoch": step / session.steps_per_epoch,
            "learning_rates": {group["name"]: group["lr"] for group in session.optimizer.param_groups}}


def validation_numbers(session: Session) -> dict:
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
