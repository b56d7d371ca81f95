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
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from sve_cli.bank import save_bank
from sve_cli.data import load_splits
from sve_cli.ensemble import SVEModel
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.inference import Parallel, member_chunks, predict
from sve_cli.metrics import HIGHER_IS_BETTER, Prediction, calibration_metrics
from sve_cli.pipeline import Pipeline
from sve_cli.recipe import Recipe, load_recipe, recipe_yaml
from sve_cli.outputs import refuse_inputs
from sve_cli.rundir import BANK, CHECKPOINT, CONFORMAL, METRICS, RECIPE, STATE, THRESHOLDS, is_run_directory, is_stub
from sve_cli.writing import atomic_path, exclusive, fault_point, save_safetensors, visible_entries, write_json



def _init_parallel() -> Parallel:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Parallel(dist.get_rank(), world)


def _prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, parallel: Parallel,
                     on_note: Callable[[str], None] | None) -> bool:
    """Returns True when an existing checkpoint should be resumed. Rank 0 holds the run's lock."""
    existing = out.exists() and bool(visible_entries(out))
    resuming = False
    if resume:
        if not (out / RECIPE).exists():
            raise SveError(f"--resume: {out} holds no run to resume (no {RECIPE}); start it without --resume")
        if load_recipe(out / RECIPE) != recipe:  # validated recipes: a new default key changes nothing
            raise SveError(f"--resume: the recipe differs from the one {out} was started with "
                           f"({out / RECIPE}); start a new run with another --out")
        resuming = (out / CHECKPOINT).exists()
        if not resuming and parallel.writer and on_note:
            on_note(f"{out} has no {CHECKPOINT} yet (killed before its first checkpoint): starting from step 0")
    elif existing and not overwrite and not is_stub(out):
        raise OutputExistsError(f"{out} already holds a run; pass --resume to continue it or --overwrite "
                                "to replace it")
    if parallel.world > 1:
        dist.barrier()  # every rank has looked at `out` before rank 0 writes into it
    if parallel.writer and not resuming:  # what an earlier run wrote (and only that) goes
        for name in (RECIPE, BANK, CHECKPOINT, STATE, METRICS, THRESHOLDS, CONFORMAL):
            (out / name).unlink(missing_ok=True)
        for folder in ("report", "tensorboard"):
            shutil.rmtree(out / folder, ignore_errors=True)
        with atomic_path(out / RECIPE) as temporary:
            temporary.write_text(recipe_yaml(recipe), encoding="utf-8")
    return resuming


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def _param_groups(model: SVEModel, recipe: Recipe) -> list[dict]:
    """AdamW groups: sigma (`sigma_lr`, `sigma_weight_decay`), heads (`head_lr`), the rest (`lr`)."""
    train = recipe.train
    trainable = model.trainable_parameters()
    sigma = [p for name, p in trainable.items() if name.endswith(".sigma")]
    heads = [p for name, p in trainable.items() if name.startswith("head.")]
    other = [p for name, p in trainable.items() if not name.endswith(".sigma") and not name.startswith("head.")]
    sigma_decay = train.weight_decay if train.sigma_weight_decay is None else train.sigma_weight_decay
    groups = [("other", other, train.lr, train.weight_decay), ("heads", heads, train.head_lr or train.lr, train.weight_decay),
              ("sigma", sigma, train.sigma_lr or train.lr, sigma_decay)]
    return [{"params": params, "lr": lr, "weight_decay": decay, "base_lr": lr, "name": name}
            for name, params, lr, decay in groups if params]


class MemberOrders:
    """The order each member sees the training data in, epoch by epoch (`train.member_batches`).

    shared: one seeded permutation per epoch for every member (the default, as before);
    shuffled: each member its own permutation; bootstrap: each member its own draw of N rows
    with replacement. All are seeded by (seed, epoch, member), so a resumed run sees the same
    batches; the step costs the same as with shared batches (the `[M·B]` batch exists anyway).
    """

    def __init__(self, rows: int, members: int, seed: int, mode: str):
        self.rows, self.seed, self.mode = rows, seed, mode
        self.members = 1 if mode == "shared" else members
        self._epoch, self._orders = -1, []

    def _order(self, epoch: int, member: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + member * 1_000_003)
        if self.mode == "bootstrap":
            return torch.randint(self.rows, (self.rows,), generator=generator)
        return torch.randperm(self.rows, generator=generator)

    def batch(self, epoch: int, offset: int, size: int) -> list[torch.Tensor]:
        """Rows of batch `offset` of `epoch`, one tensor per member (one in all for shared)."""
        if epoch != self._epoch:
            self._epoch, self._orders = epoch, [self._order(epoch, m) for m in range(self.members)]
        return [order[offset * size:(offset + 1) * size] for order in self._orders]


def _diverged(step: int, recipe: Recipe, what: str, out: Path) -> SveError:
    """The one line a diverging run stops with; what is on disk is the last good checkpoint and bank."""
    rates = ", ".join(f"{key} {value:g}" for key, value in (("train.lr", recipe.train.lr),
                                                          ("train.sigma_lr", recipe.train.sigma_lr)) if value)
    kept = f"; {out} keeps its last good checkpoint and bank" if (out / CHECKPOINT).exists() else ""
    return SveError(f"training diverged at step {step}: {what}; lower the learning rate ({rates}){kept}")


def _save_checkpoint(out: Path, model: SVEModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    names = {id(p): n for n, p in model.trainable_parameters().items()}
    tensors = {f"param.{n}": p.detach() for n, p in model.trainable_parameters().items()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"optim.{names[id(parameter)]}.{key}"] = value.detach().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    fault_point("checkpoint-write")
    save_safetensors(out / CHECKPOINT, tensors, {"sve.trainer_state": json.dumps(state)})
    write_json(out / STATE, state)


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
                    parameter.copy_(stored)
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    name = next(n for n, p in trainable.items() if p is parameter)
                    keys = [k for k in handle.keys() if k.startswith(f"optim.{name}.")]
                    optimizer.state[parameter] = {k.rsplit(".", 1)[1]: handle.get_tensor(k) for k in keys}
            torch.set_rng_state(handle.get_tensor("rng.torch"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:  # a damaged file
        raise SveError(f"--resume: {out / CHECKPOINT} is damaged ({str(error).splitlines()[0][:200]}); "
                       "start the run again with --overwrite") from None
    return state


def _tensorboard(out: Path, recipe: Recipe, parallel: Parallel, step: int):
    """A SummaryWriter on RUN/tensorboard (rank 0, when the recipe asks); a resumed run drops the
    events logged after its checkpoint (`purge_step`), so curves match an uninterrupted run."""
    if not (recipe.train.log_tensorboard and parallel.writer):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SveError("train.log_tensorboard needs the tensorboard package: "
                       "pip install 'sve-cli[tensorboard]'") from None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step or None)


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
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file, not a directory")
    if out.exists() and visible_entries(out) and not is_run_directory(out):  # before its lock is created there
        raise OutputExistsError(f"{out} holds files that are not an sve run; sve never writes there: "
                                "choose another --out")
    refuse_inputs(out, [recipe.model.path if Path(recipe.model.path).exists() else None,
                        recipe.model.decomposition, recipe.task.dataset if Path(recipe.task.dataset).exists() else None])
    parallel = _init_parallel()
    created = not out.exists()
    lock = exclusive(out, "train", wait=False) if parallel.writer else contextlib.nullcontext()
    try:
        with lock:
            return _train(recipe, out, resume, overwrite, parallel, on_step, on_eval, on_note)
    except (Exception, KeyboardInterrupt):
        if parallel.writer and is_stub(out):  # failed before its first checkpoint: nothing worth keeping
            _remove_stub(out, created)
        raise


def _remove_stub(out: Path, created: bool) -> None:
    """Remove what a run that never reached its first checkpoint wrote, so a rerun starts clean."""
    (out / RECIPE).unlink(missing_ok=True)
    if created and not visible_entries(out):
        shutil.rmtree(out, ignore_errors=True)


def _train(recipe: Recipe, out: Path, resume: bool, overwrite: bool, parallel: Parallel,
           on_step: Callable[[dict], None] | None, on_eval: Callable[[dict], None] | None,
           on_note: Callable[[str], None] | None) -> dict:
    resuming = _prepare_run_dir(out, recipe, resume, overwrite, parallel, on_note)
    train_cfg = recipe.train
    torch.manual_seed(train_cfg.seed)

    # data and model
    pipeline = Pipeline(recipe)
    splits, label_names = load_splits(recipe.task, str(recipe.task.dataset))
    model = pipeline.build_model(label_names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if train_cfg.precision == "bf16" and device.type == "cuda":
        model.use_low_precision(torch.bfloat16)
    model.to(device)
    data = {name: pipeline.encode(examples) for name, examples in splits.items()}
    train_data, eval_data = data[recipe.task.train_split], data[recipe.eval.split]
    if train_cfg.batch_size % parallel.world:
        raise SveError(f"train.batch_size {train_cfg.batch_size} is not divisible by {parallel.world} processes")
    batches_per_epoch = len(train_data) // train_cfg.batch_size
    if batches_per_epoch < train_cfg.gradient_accumulation:
        raise SveError(f"{len(train_data)} training examples are fewer than one step "
                       f"(train.batch_size × train.gradient_accumulation)")
    steps_per_epoch = batches_per_epoch // train_cfg.gradient_accumulation
    total = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * steps_per_epoch))
    warmup = int(train_cfg.warmup_ratio * total)
    eval_every = train_cfg.eval_every_steps or steps_per_epoch

    optimizer = torch.optim.AdamW(_param_groups(model, recipe))
    trained = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if parallel.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    state = {"step": 0, "total_steps": total, "best": None, "best_step": None, "history": [],
             "finished": False, "label_names": label_names}
    if resuming:
        state = _load_checkpoint(out, trained, optimizer)
    bank_extra = {"label_names": label_names, "task": recipe.task.type, "letters": pipeline.letters,
                  "recipe": recipe.model_dump(mode="json")}  # a bank alone can be predicted with

    metric, higher = recipe.eval.metric, HIGHER_IS_BETTER[recipe.eval.metric]
    chunks = member_chunks(trained.members, train_cfg.members_per_pass)
    orders = MemberOrders(len(train_data), trained.members, train_cfg.seed, train_cfg.member_batches)
    shared = train_cfg.member_batches == "shared"
    board = _tensorboard(out, recipe, parallel, state["step"])
    model.train()
    started, tokens_seen = time.perf_counter(), 0.0
    while state["step"] < total:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total, warmup, train_cfg.schedule)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, correct, rows_seen = 0.0, 0.0, 0
        for micro in range(train_cfg.gradient_accumulation):
            epoch, offset = divmod(step * train_cfg.gradient_accumulation + micro, batches_per_epoch)
            member_rows = [rows[parallel.rank::parallel.world]  # each member's rows of this batch
                           for rows in orders.batch(epoch, offset, train_cfg.batch_size)]
            for start, stop in chunks:
                # one batch that the model repeats for every member, or each member's own rows, member-major
                rows = member_rows[0] if shared else torch.cat(member_rows[start:stop])  # [b] or [m·b]
                batch = {k: v.to(device) for k, v in train_data.batch(rows).items()}
                with trained.active_members(start, stop):  # also around backward: checkpointing recomputes
                    logits = model(member_major=not shared, **batch)  # [b, m, C]
                    members, classes = logits.shape[1:]
                    labels = train_data.labels[rows].to(device).reshape(-1, len(member_rows[0])).T  # [b, 1] or [b, m]
                    labels = labels.expand(-1, members)  # [b, m]
                    loss = torch.nn.functional.cross_entropy(  # mean over rows and this chunk's members
                        logits.float().reshape(-1, classes), labels.reshape(-1))
                    if not torch.isfinite(loss):
                        raise _diverged(step + 1, recipe, f"the loss is {float(loss)}", out)
                    share = members / trained.members / train_cfg.gradient_accumulation
                    (loss * share).backward()
                loss_sum += float(loss.detach()) * share
                correct += float((logits.argmax(-1) == labels).float().mean(1).sum()) * members / trained.members
            rows_seen += len(member_rows[0])
            tokens_seen += sum(train_data.tokens(rows) for rows in member_rows) / len(member_rows)
        if train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained.trainable_parameters().values(), train_cfg.grad_clip)
        optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in trained.trainable_parameters().values()):
            raise _diverged(step + 1, recipe, "a trained value is no longer finite", out)
        state["step"] = step = step + 1
        elapsed = time.perf_counter() - started
        on_step and on_step({"step": step, "total": total, "loss": loss_sum, "accuracy": correct / max(1, rows_seen),
                             "tokens_per_second": tokens_seen * parallel.world / max(elapsed, 1e-9),
                             "epoch": step / steps_per_epoch})
        if board is not None:
            board.add_scalar("train/loss", loss_sum, step)
            board.add_scalar("train/member_accuracy", correct / max(1, rows_seen), step)
            for group in optimizer.param_groups:
                board.add_scalar(f"lr/{group['name']}", group["lr"], step)

        if step % eval_every == 0 or step == total:
            logits = predict(trained, eval_data, recipe.eval.batch_size, parallel,
                             members_per_pass=train_cfg.members_per_pass)
            numbers = calibration_metrics(Prediction.of(logits, recipe.eval.combine), eval_data.labels, recipe.eval.bins)
            line = {"step": step, "epoch": round(step / steps_per_epoch, 4), "split": recipe.eval.split,
                    "train_loss": loss_sum, **numbers}
            state["history"].append(line)
            if board is not None:
                for key in ("accuracy", "nll", "brier", "ece", "disagreement"):
                    board.add_scalar(f"{recipe.eval.split}/{key}", numbers[key], step)
                board.flush()
            value = numbers[metric]
            improved = state["best"] is None or (value > state["best"] if higher else value < state["best"])
            if improved:
                state["best"], state["best_step"] = value, step
                if parallel.writer:
                    save_bank(trained, out / BANK, {**bank_extra, "step": step, metric: value})
            state["finished"] = step == total
            if parallel.writer:
                _write_metrics(out, state["history"])
                _save_checkpoint(out, trained, optimizer, state)
            on_eval and on_eval(line)
        elif step % train_cfg.checkpoint_every_steps == 0 and parallel.writer:
            _save_checkpoint(out, trained, optimizer, state)
    if board is not None:
        board.close()
    if parallel.world > 1:
        dist.barrier()
    return state
