"""`sve evaluate`: calibration and OOD detection of a trained run, on its own preprocessing.

A run directory is rebuilt from its resolved recipe and best bank (`Pipeline` + `load_bank`), so
evaluation sees exactly the model and preprocessing that training saw. In-distribution data is the
recipe's test split unless `--data` names another set; every `--ood` set goes through the same
pipeline (multiple-choice items are posed with the same question and letters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sve_cli.bank import load_bank, read_bank_metadata
from sve_cli.data import BUILTIN_DATA, Examples, Table, build_examples, load_source, load_splits, unlabelled_examples
from sve_cli.errors import SveError
from sve_cli.metrics import calibration_metrics, fit_temperature, ood_metrics
from sve_cli.pipeline import Pipeline
from sve_cli.inference import predict
from sve_cli.rundir import RECIPE, open_run
from sve_cli.selective import file_fingerprint, fit_thresholds, selective_metrics

# common public OOD names -> (hub id, config, split); they need a network
HUB_OOD = {
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "test"),
    "cifar10": ("uoft-cs/cifar10", None, "test"),
    "cifar100": ("uoft-cs/cifar100", None, "test"),
    "sst2": ("stanfordnlp/sst2", None, "validation"),
    "imdb": ("stanfordnlp/imdb", None, "test"),
}


@dataclass
class Evaluation:
    run: Path
    metadata: dict
    labels: torch.Tensor
    logits: torch.Tensor  # [N, M, C]
    metrics: dict
    ood: dict[str, dict] = field(default_factory=dict)
    ood_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    temperature: dict | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    data_name: str = ""
    selective: dict = field(default_factory=dict)  # per score: AURC, accuracy at coverage (in-distribution)
    thresholds: dict = field(default_factory=dict)  # per score: fitted on validation (selective.fit_thresholds)
    bank_fingerprint: str = ""


def _ood_table(name: str, limit: int | None) -> tuple[Table, str]:
    if name in HUB_OOD:
        repo, config, split = HUB_OOD[name]
        source = load_source(repo, config)
        if split not in source:
            raise SveError(f"OOD set '{name}' ({repo}) has no '{split}' split")
        table = source[split]
    elif name in BUILTIN_DATA or name.startswith("builtin:") or Path(name).exists():
        source = load_source(name if name.startswith("builtin:") or Path(name).exists() else f"builtin:{name}")
        table = source if isinstance(source, Table) else source.get("test") or next(iter(source.values()))
    else:
        known = ", ".join([*BUILTIN_DATA, *HUB_OOD])
        raise SveError(f"unknown OOD set '{name}': use a built-in or public name ({known}) or a local path")
    if limit is not None and len(table.frame) > limit:
        rows = torch.randperm(len(table.frame), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        table = Table(table.frame.iloc[rows.tolist()].reset_index(drop=True), table.label_names, table.is_image)
    return table, Path(name).stem if Path(name).exists() else name.removeprefix("builtin:")


def evaluate_run(run: Path, data: str | None = None, ood: list[str] = (), bins: int = 15,
                 combine_how: str = "probs", temperature: bool = False, max_examples: int | None = None,
                 on_batch: Callable[[str, int, int], None] | None = None, bank: Path | None = None) -> Evaluation:
    """Predict, score and compare one run (with its own bank, or `bank`, e.g. an exported one).
    `on_batch(set_name, done, total)` reports progress."""
    run = Path(run)
    recipe, bank = open_run(run, bank)
    metadata = read_bank_metadata(bank)
    label_names = list(metadata["label_names"])
    pipeline = Pipeline(recipe)
    model = pipeline.build_model(label_names)
    load_bank(model, bank)
    limit = max_examples or recipe.task.max_eval_examples

    def run_set(name: str, examples: Examples) -> torch.Tensor:
        encoded = pipeline.encode(examples)
        done = [0]

        def progress(count: int) -> None:
            done[0] += count
            on_batch and on_batch(name, done[0], len(encoded))

        return predict(model, encoded, recipe.eval.batch_size, on_batch=progress)

    if data is None:
        splits, _ = load_splits(recipe.task, str(run / RECIPE))
        examples, data_name = splits[recipe.task.test_split], f"{recipe.task.dataset} [{recipe.task.test_split}]"
    else:
        source = load_source(data, recipe.task.config)
        table = source if isinstance(source, Table) else source.get("test") or next(iter(source.values()))
        if limit is not None and len(table.frame) > limit:
            table = Table(table.frame.iloc[:limit].reset_index(drop=True), table.label_names, table.is_image)
        examples, data_name = build_examples(table, recipe.task, label_names, data), data
    logits = run_set("in-distribution", examples)
    result = Evaluation(run, metadata, examples.labels, logits,
                        calibration_metrics(logits, examples.labels, bins, combine_how),
                        sizes={"in_distribution": len(examples)}, data_name=data_name,
                        selective=selective_metrics(logits, examples.labels, combine_how),
                        bank_fingerprint=file_fingerprint(bank))

    # the validation split: abstention thresholds, and the temperature when asked
    splits, _ = load_splits(recipe.task, str(run / RECIPE))
    validation = splits[recipe.task.validation_split]
    validation_logits = run_set("validation", validation)
    result.sizes["validation"] = len(validation)
    result.thresholds = fit_thresholds(validation_logits, validation.labels, combine_how)
    if temperature:
        fitted = fit_temperature(validation_logits, validation.labels, combine_how)
        result.temperature = {"temperature": fitted, "fitted_on": recipe.task.validation_split,
                              "after": calibration_metrics(logits / fitted, examples.labels, bins, combine_how)}

    for name in ood:
        table, short = _ood_table(name, limit)
        ood_examples, _ = unlabelled_examples(table, recipe.task, label_names, f"OOD set '{short}'", keep_labels=False)
        result.ood_logits[short] = run_set(f"OOD {short}", ood_examples)
        result.ood[short] = ood_metrics(logits, result.ood_logits[short], combine_how)
        result.sizes[f"ood.{short}"] = len(ood_examples)
    return result

