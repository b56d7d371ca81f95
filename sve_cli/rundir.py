"""A run directory: what `sve train` writes into it, and the one check evaluate, export and predict
make before reading it.

    recipe.yaml              the resolved recipe
    sigma_bank.safetensors   the best bank by the validation metric
    checkpoint.safetensors   trainable state, AdamW moments, RNG, step (for --resume)
    trainer_state.json       the same state, readable
    metrics.jsonl            one line per evaluation
    thresholds.json          abstention thresholds fitted on validation (`sve evaluate`)
"""

from __future__ import annotations

from pathlib import Path

from sve_cli.errors import SveError
from sve_cli.recipe import Recipe, load_recipe

RECIPE, BANK, CHECKPOINT, STATE, METRICS, THRESHOLDS = (
    "recipe.yaml", "sigma_bank.safetensors", "checkpoint.safetensors", "trainer_state.json", "metrics.jsonl",
    "thresholds.json")


def open_run(run: Path, bank: Path | None = None) -> tuple[Recipe, Path]:
    """The run's recipe and the bank to use (its own, or `bank`), or one clear error."""
    run = Path(run)
    if not (run / RECIPE).exists():
        raise SveError(f"{run} is not a run directory (no {RECIPE}); train one with `sve train`")
    chosen = Path(bank) if bank else run / BANK
    if not chosen.exists():
        raise SveError(f"{run} has no {BANK}: the run has not finished an evaluation yet"
                       if bank is None else f"bank {bank} does not exist")
    return load_recipe(run / RECIPE), chosen
