"""A run directory's lifecycle: what `sve train` writes into it (and may replace, resume or clean up), and the
one check evaluate, export and predict make before reading it.

    recipe.yaml              the resolved recipe
    sigma_bank.safetensors   the best bank by the validation metric
    checkpoint.safetensors   trainable state, AdamW moments, RNG, step (for --resume)
    trainer_state.json       the same state, readable
    metrics.jsonl            one line per evaluation
    lr_sweep.json            what `train.lr: auto` tried and chose (a resumed run does not sweep again)
    thresholds.json          abstention thresholds fitted on validation (`sve evaluate`)
    conformal.json           conformal thresholds (prediction sets) fitted on validation (`sve evaluate`)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from sve_cli.errors import OutputExistsError, SveError
from sve_cli.recipe import RUN_RECIPE_HEADER, Recipe, load_recipe, recipe_yaml
from sve_cli.writing import atomic_path, visible_entries

RECIPE, BANK, CHECKPOINT, STATE, METRICS, THRESHOLDS, CONFORMAL, LR_SWEEP = (
    "recipe.yaml", "sigma_bank.safetensors", "checkpoint.safetensors", "trainer_state.json", "metrics.jsonl",
    "thresholds.json", "conformal.json", "lr_sweep.json")


def _written_by_train(recipe: Path) -> bool:
    try:
        with open(recipe, encoding="utf-8") as handle:
            return handle.readline() == RUN_RECIPE_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def is_run_directory(path: Path) -> bool:
    """A directory `sve train` made: its trainer state, checkpoint, or a recipe it wrote."""
    return (path / STATE).is_file() or (path / CHECKPOINT).is_file() or _written_by_train(path / RECIPE)


def is_stub(path: Path) -> bool:
    """A run that never reached its first checkpoint (killed or failed at the start): only its recipe (and
    the lr sweep's record)."""
    names = {p.name for p in visible_entries(path)}
    return RECIPE in names and names <= {RECIPE, LR_SWEEP} and _written_by_train(path / RECIPE)


def check_reuse(out: Path, recipe: Recipe, resume: bool, overwrite: bool,
                on_note: Callable[[str], None] | None) -> bool:
    """Whether `sve train` may write into `out` (one line when not); True when it resumes a checkpoint."""
    if resume:
        if not (out / RECIPE).exists():
            raise SveError(f"--resume: {out} holds no run to resume (no {RECIPE}); start it without --resume")
        if load_recipe(out / RECIPE) != recipe:  # validated recipes: a new default key changes nothing
            raise SveError(f"--resume: the recipe differs from the one {out} was started with "
                           f"({out / RECIPE}); start a new run with another --out")
        resuming = (out / CHECKPOINT).exists()
        if not resuming and on_note:
            on_note(f"{out} has no {CHECKPOINT} yet (killed before its first checkpoint): starting from step 0")
        return resuming
    if out.exists() and visible_entries(out) and not overwrite and not is_stub(out):
        raise OutputExistsError(f"{out} already holds a run; pass --resume to continue it or --overwrite "
                                "to replace it")
    return False


def start_fresh(out: Path, recipe: Recipe) -> None:
    """Remove what an earlier run wrote (and only that), then write the resolved recipe."""
    for name in (RECIPE, BANK, CHECKPOINT, STATE, METRICS, THRESHOLDS, CONFORMAL, LR_SWEEP):
        (out / name).unlink(missing_ok=True)
    for folder in ("report", "tensorboard"):
        shutil.rmtree(out / folder, ignore_errors=True)
    with atomic_path(out / RECIPE) as temporary:
        temporary.write_text(recipe_yaml(recipe), encoding="utf-8")


def remove_stub(out: Path, created: bool) -> None:
    """Remove what a run that never reached its first checkpoint wrote, so a rerun starts clean."""
    (out / RECIPE).unlink(missing_ok=True)
    (out / LR_SWEEP).unlink(missing_ok=True)
    if created and not visible_entries(out):
        shutil.rmtree(out, ignore_errors=True)


def write_fitted(run: Path, thresholds: dict, conformal: dict) -> list[Path]:
    """`RUN/thresholds.json` and `RUN/conformal.json`, as `sve evaluate` fitted them (`report.fitted_payloads`)."""
    from sve_cli.writing import write_json

    write_json(run / THRESHOLDS, thresholds)
    write_json(run / CONFORMAL, conformal)
    return [run / THRESHOLDS, run / CONFORMAL]


def read_fitted(path: Path, bank: Path, stale_ok: bool = False) -> dict | None:
    """A run's `thresholds.json` or `conformal.json` when `sve evaluate` fitted it for `bank` (its sha256);
    None when there is none (or, with `stale_ok`, when it was fitted for an earlier bank)."""
    from sve_cli.checkpoint import file_fingerprint, read_json

    if not path.exists():
        return None
    fitted = read_json(path, "run `sve evaluate` on the run again")
    if not isinstance(fitted, dict) or not isinstance(fitted.get("scores"), dict):
        raise SveError(f"{path} is not what `sve evaluate` writes; run `sve evaluate` on the run again")
    if fitted.get("bank") != file_fingerprint(bank):
        if stale_ok:
            return None
        raise SveError(f"{path} was fitted for another bank than {bank}; run `sve evaluate` on the run again")
    return fitted


def open_run(run: Path, bank: Path | None = None) -> tuple[Recipe, Path]:
    """The run's recipe and the bank to use (its own, or `bank`: one trained for the same task and
    labels, e.g. the run's exported bank), or one clear error."""
    run = Path(run)
    if not (run / RECIPE).exists():
        raise SveError(f"{run} is not a run directory (no {RECIPE}); train one with `sve train`")
    chosen = Path(bank) if bank else run / BANK
    if not chosen.exists():
        raise SveError(f"{run} has no {BANK}: the run has not finished an evaluation yet"
                       if bank is None else f"bank {bank} does not exist")
    recipe = load_recipe(run / RECIPE)
    if bank is not None:
        from sve_cli.bank import read_bank_metadata

        theirs = read_bank_metadata(chosen)
        ours = read_bank_metadata(run / BANK) if (run / BANK).exists() else {}
        for key in ("task", "label_names"):
            if key in ours and theirs.get(key) != ours[key]:
                raise SveError(f"bank {bank} was trained for another {key.replace('_', ' ')} "
                               f"({theirs.get(key)}) than {run} ({ours[key]})")
    return recipe, chosen
