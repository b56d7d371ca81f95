"""`sve train`: joint M-member fine-tuning from a recipe. Reads top to bottom like a script.

The run directory's files are listed in `sve_cli.rundir`. Every file is written atomically; a run killed at any moment and resumed ends with
the same result as an uninterrupted one (CPU, fixed seed).

Data parallel: under `torchrun`, each rank takes an equal slice of every global batch, gradients
are averaged by DDP, validation logits are gathered, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from sve_cli.bank import bank_tensors, save_bank
from sve_cli.ensemble import SVEModel
from sve_cli.errors import OutputExistsError, SveError
from sve_cli.distributed import Parallel, barrier, full, init_parallel, like, settle
from sve_cli.inference import predict
from sve_cli.vocabulary import METRIC, VALIDATION_METRICS
from sve_cli.metrics import Prediction, calibration_metrics, fit_calibration, temperature_of
from sve_cli.recipe import Recipe
from sve_cli.outputs import refuse_inputs, refuse_unusual
from sve_cli.rundir import (BANK, CHECKPOINT, METRICS, STATE, check_reuse, is_run_directory, is_stub, remove_stub,
                            start_fresh)
from sve_cli.session import Session, new_session, train_step, training_device, validation_numbers
from sve_cli.tuning import resolved_lr
from sve_cli.writing import atomic_path, exclusive, fault_point, save_safetensors, visible_entries, write_json


def _prepare_run_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool, parallel: Parallel,
                     on_note: Callable[[str], None] | None) -> bool:
    """Returns True when an existing checkpoint should be resumed. Rank 0 holds the run's lock."""
    resuming = check_reuse(out, recipe, resume, overwrite, on_note if parallel.writer else None)
    barrier(parallel)  # every rank has looked at `out` before rank 0 writes into it
    if parallel.writer and not resuming:
        start_fresh(out, recipe)
    return resuming


def _save_checkpoint(session: Session) -> None:
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


def _tensorboard(session: Session) -> list[Listener]:
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


def _train(recipe: Recipe, out: Path, resume: bool, overwrite: bool, parallel: Parallel,
           listeners: list, on_note: Callable[[str], None] | None) -> dict:
    """Set up, then one optimiser step at a time: evaluate and keep the best bank when due, checkpoint."""
    session = _setup(recipe, out, resume, overwrite, parallel, on_note)
    listeners = listeners + _tensorboard(session)
    while session.state["step"] < session.total:
        info = train_step(session)
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
    session = new_session(recipe, out, parallel, on_note)
    if resuming:
        session.state = _load_checkpoint(out, session.ensemble, session.optimizer)
    return session


def _evaluate_and_keep_best(session: Session) -> dict:
    """Score the validation split and fit its temperature (eval.calibration); write the bank, with that
    temperature, when the metric improved; then metrics and checkpoint."""
    recipe, state, parallel = session.recipe, session.state, session.parallel
    if session.ensemble.head_kind == "tokens":  # generation: the target tokens' accuracy and NLL, uncalibrated
        numbers, calibration = validation_numbers(session), {"method": "none", "why": "generation"}
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
