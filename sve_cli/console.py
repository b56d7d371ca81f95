"""How sve talks to the terminal: its two consoles, progress bars, one-line errors, the library's notices,
and the dry-run's memory plan and time estimate."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from sve_cli import display
from sve_cli.errors import SveError

console = Console(stderr=True)
out_console = Console()


def status_column() -> TextColumn:
    """A task's status text: it takes the width left over and is cut with "…", so the clocks never are."""
    return TextColumn("{task.fields[status]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))


def progress_bar(*columns, eta: bool = True, disable: bool = False) -> Progress:
    """A transient progress display on stderr: description, `columns`, elapsed time (and the ETA)."""
    clock = Column(min_width=7, no_wrap=True)  # never cut to `0:02:…` when the status text is long
    tail = (TextColumn("eta"), TimeRemainingColumn(table_column=clock)) if eta else ()
    return Progress(TextColumn("[bold]{task.description}"), *columns, TimeElapsedColumn(table_column=clock), *tail,
                    console=console, transient=True, disable=disable, expand=True)


def print_memory_plan(recipe, device: str, memory: str | None, nproc: int) -> None:
    """The dry-run's table: what training `recipe` needs on `device` (\"auto\": the recipe's, else cuda when present)."""
    import torch

    from sve_cli.export import recipe_export_notes
    from sve_cli.memory import device_capacity, plan_training
    from sve_cli.writing import parse_size

    if device != "auto":
        chosen = device
    elif recipe.train.device != "auto":
        chosen = recipe.train.device  # the device the recipe is meant for, GPU or not on this machine
    else:
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
    capacity = parse_size(memory) if memory else device_capacity(chosen)
    with console.status(f"reading {recipe.model.path} and {recipe.task.dataset_name}…"):
        estimate = plan_training(recipe, chosen, capacity, nproc)
        if recipe.task.local_paths or str(recipe.task.dataset).startswith("builtin:"):  # hub sets are not fetched
            from sve_cli.data import load_splits
            from sve_cli.pipeline import Pipeline

            splits, label_names = load_splits(recipe.task, recipe.task.dataset_name)
            for note in Pipeline(recipe).data_notes(splits, label_names):
                out_console.print(note, soft_wrap=True, highlight=False)
    out_console.print(display.memory_plan(recipe, estimate, chosen, capacity, recipe_export_notes(recipe)))


def print_time_estimate(recipe, nproc: int) -> None:
    from sve_cli.tuning import estimate_time

    if nproc != 1:
        raise SveError("--time measures one process on this machine: drop --nproc")
    with console.status("measuring 3 training steps and an evaluation batch…"):
        estimate = estimate_time(recipe)
    minutes = lambda seconds: f"{seconds / 60:.1f} min"  # noqa: E731
    out_console.print(f"time on this machine (measured: {estimate['seconds_per_step']:.2f} s/step): training "
                      f"{estimate['steps']:,} steps ≈ {minutes(estimate['train_seconds'])}, {estimate['evaluations']} "
                      f"evaluation(s) of {estimate['evaluation_rows']:,} rows ≈ {minutes(estimate['evaluation_seconds'])}; "
                      + (f"the lr: auto sweep ≈ {minutes(estimate['sweep_seconds'])}; " if estimate["sweep_seconds"] else "")
                      + f"about {minutes(estimate['total_seconds'])} in all (loading the model and data not counted)",
                      soft_wrap=True, highlight=False)


def one_line(text: str) -> str:
    """One line, naming final outputs rather than the temporaries they are written under."""
    from sve_cli.writing import public_names

    return " ".join(public_names(str(text)).split())


class Notices(logging.StreamHandler):
    """The library's notices as `sve: …` lines on whatever stderr is at the time of the notice."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("sve: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; stderr is looked up at each notice
        pass


def show_library_notices() -> None:
    """Let the "sve" logger's INFO notices reach stderr (once; an application's own handler is kept)."""
    logger = logging.getLogger("sve")
    if not logger.handlers:
        logger.addHandler(Notices())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def print_error(text: str, peer_lost: bool = False) -> None:
    """One `error:` line — under `sve train --nproc`, recorded for the launcher, which prints each cause once."""
    from sve_cli.launcher import record_rank_message

    if not record_rank_message(text, peer_lost):
        console.print(f"[red]error:[/red] {text}", highlight=False, soft_wrap=True)


def is_peer_lost(error: RuntimeError) -> bool:
    """A collective that failed because another rank of this torchrun job stopped (gloo, NCCL)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    return isinstance(error, getattr(distributed, "DistError", ())) or any(
        fragment in str(error) for fragment in ("Connection closed by peer", "Connection reset by peer",
                                                "Broken pipe", "NCCL communicator was aborted"))


