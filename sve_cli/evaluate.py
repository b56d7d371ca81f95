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

from sve_cli.data import (BUILTIN_DATA, Examples, Table, build_examples, load_source, load_splits, test_split,
                          unlabelled_examples)
from sve_cli import conformal
from sve_cli.errors import SveError
from sve_cli.metrics import Prediction, calibration_metrics, fit_temperature, ood_metrics
from sve_cli.pipeline import load_ensemble
from sve_cli.distributed import for_inference
from sve_cli.inference import predict
from sve_cli.rundir import RECIPE, open_run
from sve_cli.checkpoint import file_fingerprint
from sve_cli.selective import fit_thresholds, selective_metrics

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
    prediction: Prediction  # the in-distribution set, members combined as the run says
    metrics: dict
    validation: Prediction  # the validation split: thresholds, temperature, conformal sets
    validation_labels: torch.Tensor
    ood: dict[str, dict] = field(default_factory=dict)
    ood_predictions: dict[str, Prediction] = field(default_factory=dict)
    temperature: dict | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    data_name: str = ""
    selective: dict = field(default_factory=dict)  # per score: AURC, accuracy at coverage (in-distribution)
    thresholds: dict = field(default_factory=dict)  # per score: fitted on validation (selective.fit_thresholds)
    bank_fingerprint: str = ""
    conformal: dict = field(default_factory=dict)  # per level and score: coverage and set sizes (in-distribution)
    conformal_thresholds: dict = field(default_factory=dict)  # per score and level: fitted on validation
    ood_sources: dict[str, str] = field(default_factory=dict)  # OOD set name in the report -> what was given
    bins: int = 15

    @property
    def combine(self) -> str:
        return self.prediction.how


def _table(name: str, config: str | None = None, any_hub_name: bool = False, what: str = "OOD set") -> Table:
    """A data set named on the command line: a local path, a built-in name, one of the public OOD names,
    or (`--data`) any hub name."""
    if name in HUB_OOD:
        repo, hub_config, split = HUB_OOD[name]
        source = load_source(repo, hub_config)
        if split not in source:
            raise SveError(f"OOD set '{name}' ({repo}) has no '{split}' split")
        return source[split]
    if name in BUILTIN_DATA and not Path(name).exists():
        name = f"builtin:{name}"
    if not (name.startswith("builtin:") or Path(name).exists() or any_hub_name):
        known = ", ".join([*BUILTIN_DATA, *HUB_OOD])
        raise SveError(f"unknown {what} '{name}': use a built-in or public name ({known}) or a local path")
    return test_split(load_source(name, config))


def _short_name(name: str, taken) -> str:
    """The set's name in the report: its file stem or built-in name, made unique (x, x-2, …)."""
    short = Path(name).stem if Path(name).exists() else name.removeprefix("builtin:")
    return next(candidate for i in range(1, len(taken) + 2)
                if (candidate := short if i == 1 else f"{short}-{i}") not in taken)


def evaluate_run(run: Path, data: str | None = None, ood: list[str] = (), bins: int | None = None,
                 combine_how: str | None = None, temperature: bool = False, max_examples: int | None = None,
                 on_batch: Callable[[str, int, int], None] | None = None, bank: Path | None = None,
                 cache_budget: str | None = None) -> Evaluation:
    """Predict, score and compare one run (with its own bank, or `bank`, e.g. an exported one).
    `bins` and `combine_how` default to the recipe's `eval` section; `--data` and every `--ood` set are
    capped at `max_examples` (or the recipe's max_eval_examples) by the same seeded sample.
    `on_batch(set_name, done, total)` reports progress."""
    run = Path(run)
    recipe, bank = open_run(run, bank)
    bins, combine_how = bins or recipe.eval.bins, combine_how or recipe.eval.combine
    budget = cache_budget or recipe.eval.cache_budget
    limit = max_examples or recipe.task.max_eval_examples
    data_table = None if data is None else _table(data, recipe.task.config, any_hub_name=True, what="data set").sample(limit)
    ood_tables = [_table(name).sample(limit) for name in ood]  # a bad set fails before the model loads
    pipeline, model, metadata = load_ensemble(recipe, bank)
    parallel = for_inference(model, recipe.train.parallelism)
    label_names = list(metadata["label_names"])

    def run_set(name: str, examples: Examples) -> Prediction:
        encoded = pipeline.encode(examples)
        done = [0]

        def progress(count: int) -> None:
            done[0] += count
            on_batch and on_batch(name, done[0], len(encoded))

        return Prediction.of(predict(model, encoded, recipe.eval.batch_size, parallel, on_batch=progress,
                                     members_per_pass=recipe.train.members_per_pass,
                                     budget=budget), combine_how)

    splits, _ = load_splits(recipe.task, str(run / RECIPE))
    if data is None:
        examples, data_name = splits[recipe.task.test_split], f"{recipe.task.dataset} [{recipe.task.test_split}]"
    else:
        examples, data_name = build_examples(data_table, recipe.task, label_names, data), data
    prediction = run_set("in-distribution", examples)
    validation = splits[recipe.task.validation_split]
    validation_prediction = run_set("validation", validation)  # abstention thresholds, temperature
    result = Evaluation(run, metadata, examples.labels, prediction, calibration_metrics(prediction, examples.labels, bins),
                        validation_prediction, validation.labels,
                        sizes={"in_distribution": len(examples), "validation": len(validation)},
                        data_name=data_name, selective=selective_metrics(prediction, examples.labels),
                        thresholds=fit_thresholds(validation_prediction, validation.labels),
                        bank_fingerprint=file_fingerprint(bank), bins=bins,
                        conformal_thresholds=conformal.fit(validation_prediction, validation.labels))
    result.conformal = conformal.evaluate(prediction, examples.labels, result.conformal_thresholds, len(validation))
    if temperature:
        fitted = fit_temperature(validation_prediction.logits, validation.labels, combine_how)
        result.temperature = {"temperature": fitted, "fitted_on": recipe.task.validation_split,
                              "after": calibration_metrics(prediction.scaled(fitted), examples.labels, bins)}

    for name, table in zip(ood, ood_tables):
        short = _short_name(name, result.ood_predictions)
        result.ood_sources[short] = name
        ood_examples, _ = unlabelled_examples(table, recipe.task, label_names,
                                              f"OOD set '{short}'", keep_labels=False)
        result.ood_predictions[short] = run_set(f"OOD {short}", ood_examples)
        result.ood[short] = ood_metrics(prediction, result.ood_predictions[short])
        result.sizes[f"ood.{short}"] = len(ood_examples)
    return result
