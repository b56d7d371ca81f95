"""`sve evaluate`: calibration and OOD detection of a trained run, on its own preprocessing.

A run directory is rebuilt from its resolved recipe and best bank (`Pipeline` + `load_bank`), so
evaluation sees exactly the model and preprocessing that training saw. In-distribution data is the
recipe's test split unless `--data` names another set; every `--ood` set goes through the same
pipeline (multiple-choice items are posed with the same question and letters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from sve_cli.vocabulary import VALIDATION_METRICS
from sve_cli.data import (BUILTIN_DATA, Examples, Table, build_examples, load_source, load_splits, split_origins,
                          test_split, unlabelled_examples)
from sve_cli import conformal
from sve_cli.errors import SveError
from sve_cli.metrics import Prediction, calibration_metrics, fit_calibration, ood_metrics
from sve_cli.pipeline import load_ensemble
from sve_cli.distributed import for_inference
from sve_cli.inference import predict
from sve_cli.rundir import RECIPE, open_run
from sve_cli.checkpoint import file_fingerprint
from sve_cli.selective import fit_thresholds, selective_metrics

# common public OOD names -> (hub id, config, split, what it holds); they need a network
HUB_OOD = {
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "test", "images"),
    "cifar10": ("uoft-cs/cifar10", None, "test", "images"),
    "cifar100": ("uoft-cs/cifar100", None, "test", "images"),
    "sst2": ("stanfordnlp/sst2", None, "validation", "text"),
    "imdb": ("stanfordnlp/imdb", None, "test", "text"),
}
BUILTIN_KINDS = {"tweets": "text", "bbc_news": "text", "bbc_headlines": "text", "digits": "images", "mnist": "images"}
SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Evaluation:
    run: Path
    metadata: dict
    labels: torch.Tensor
    prediction: Prediction  # the in-distribution set, members combined as the run says, calibrated
    metrics: dict  # of `prediction`: what a user of the run's probabilities gets
    validation: Prediction  # the validation split, calibrated: thresholds, conformal sets
    validation_labels: torch.Tensor
    raw: Prediction  # the in-distribution set before calibration
    raw_metrics: dict
    calibration: dict  # method, temperature (1 for none), where it came from
    ood: dict[str, dict] = field(default_factory=dict)
    ood_predictions: dict[str, Prediction] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    data_name: str = ""
    selective: dict = field(default_factory=dict)  # per score: AURC, accuracy at coverage (in-distribution)
    thresholds: dict = field(default_factory=dict)  # per score: fitted on validation (selective.fit_thresholds)
    bank_fingerprint: str = ""
    conformal: dict = field(default_factory=dict)  # per level and score: coverage and set sizes (in-distribution)
    conformal_thresholds: dict = field(default_factory=dict)  # per score and level: fitted on validation
    conformal_by_class: dict = field(default_factory=dict)  # the same for class-conditional (Mondrian) sets
    class_thresholds: dict = field(default_factory=dict)  # per score and level: one threshold per class
    ood_sources: dict[str, str] = field(default_factory=dict)  # OOD set name in the report -> what was given
    bins: int = 15

    @property
    def combine(self) -> str:
        return self.prediction.how

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))


def _table(name: str, config: str | None = None, any_hub_name: bool = False, what: str = "OOD set") -> Table:
    """A data set named on the command line: a local path, a built-in name, one of the public OOD names,
    or (`--data`) any hub name."""
    if name in HUB_OOD:
        repo, hub_config, split, _ = HUB_OOD[name]
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


def named_set(given: str) -> tuple[str | None, str]:
    """`--ood NAME=PATH` -> (NAME, PATH): the name the report gives the set; (None, given) otherwise."""
    name, sep, spec = given.partition("=")
    if sep and SET_NAME.fullmatch(name) and not Path(given).exists():
        return name, spec
    return None, given


def _short_name(given: str, taken) -> str:
    """The set's name in the report: the NAME of NAME=PATH, else its file stem or built-in name, made
    unique (x, x-2, …)."""
    name, spec = named_set(given)
    short = name or (Path(spec).stem if Path(spec).exists() else spec.removeprefix("builtin:"))
    return next(candidate for i in range(1, len(taken) + 2)
                if (candidate := short if i == 1 else f"{short}-{i}") not in taken)


def _refuse_other_kinds(names: list[str], task_type: str) -> None:
    """Before any set is read: a public or built-in set of images for a text run (or the reverse) cannot
    work, however long the download."""
    wanted = "images" if task_type == "image_classification" else "text"
    for given in names:
        spec = named_set(given)[1].removeprefix("builtin:")
        kind = HUB_OOD[spec][3] if spec in HUB_OOD else BUILTIN_KINDS.get(spec) if not Path(spec).exists() else None
        if kind is not None and kind != wanted:
            known = ", ".join(n for n, k in {**BUILTIN_KINDS, **{n: v[3] for n, v in HUB_OOD.items()}}.items()
                              if k == wanted)
            raise SveError(f"OOD set '{given}' holds {kind}, but this run classifies {wanted}: use one of {known} "
                           "or a local file")


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
    _refuse_other_kinds(list(ood), recipe.task.type)
    ood_tables = [_table(named_set(name)[1]).sample(limit) for name in ood]  # a bad set fails before the model loads
    for name, table in zip(ood, ood_tables):
        if table.is_image != (recipe.task.type == "image_classification"):
            raise SveError(f"OOD set '{name}' holds {'images' if table.is_image else 'text'}, but this run "
                           f"classifies {'images' if recipe.task.type == 'image_classification' else 'text'}")
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
        test = recipe.task.test_split
        examples, data_name = splits[test], f"{split_origins(recipe.task)[test]} [{test}]"
    else:
        examples, data_name = build_examples(data_table, recipe.task, label_names, data), data
    raw = run_set("in-distribution", examples)
    validation = splits[recipe.task.validation_split]
    raw_validation = run_set("validation", validation)  # temperature, abstention thresholds, conformal sets
    calibration = _calibration(metadata, raw_validation, validation.labels, refit=temperature)
    prediction, validation_prediction = raw.scaled(calibration["temperature"]), raw_validation.scaled(calibration["temperature"])
    result = Evaluation(run, metadata, examples.labels, prediction, calibration_metrics(prediction, examples.labels, bins),
                        validation_prediction, validation.labels, raw, calibration_metrics(raw, examples.labels, bins),
                        calibration, sizes={"in_distribution": len(examples), "validation": len(validation)},
                        data_name=data_name, selective=selective_metrics(prediction, examples.labels),
                        thresholds=fit_thresholds(validation_prediction, validation.labels),
                        bank_fingerprint=file_fingerprint(bank), bins=bins,
                        conformal_thresholds=conformal.fit(validation_prediction, validation.labels))
    result.conformal = conformal.evaluate(prediction, examples.labels, result.conformal_thresholds, validation.labels)
    result.class_thresholds = conformal.fit_by_class(validation_prediction, validation.labels)
    result.conformal_by_class = conformal.evaluate(prediction, examples.labels, result.class_thresholds, validation.labels)
    if calibration.get("member_temperatures"):  # the alternative: each member calibrated alone, then pooled
        member_scale = torch.tensor(calibration["member_temperatures"], dtype=torch.float64)[None, :, None]
        pooled = Prediction.of(raw.logits / member_scale, combine_how)
        calibration["per_member_then_pool"] = {key: value for key, value in calibration_metrics(
            pooled, examples.labels, bins).items() if key in VALIDATION_METRICS}

    for name, table in zip(ood, ood_tables):
        short = _short_name(name, result.ood_predictions)
        result.ood_sources[short] = name
        ood_examples, _ = unlabelled_examples(table, recipe.task, label_names,
                                              f"OOD set '{short}'", keep_labels=False)
        result.ood_predictions[short] = run_set(f"OOD {short}", ood_examples).scaled(result.temperature)
        result.ood[short] = ood_metrics(prediction, result.ood_predictions[short])
        result.sizes[f"ood.{short}"] = len(ood_examples)
    return result


def _calibration(metadata: dict, validation: Prediction, labels: torch.Tensor, refit: bool) -> dict:
    """The bank's stored calibration (fitted at the end of training). With `refit` (`--temperature`), or
    when evaluate combines members otherwise than training did, one fitted now on the validation split by
    the same function; a bank without one (calibration off, or older) is reported raw."""
    stored = metadata.get("calibration")
    other_mode = bool(stored) and stored.get("method") == "temperature" and stored.get("combine") != validation.how
    if refit or other_mode:
        fitted = fit_calibration(validation.logits, labels, validation.how)
        why = f" (members combined by {validation.how}, not as at training)" if other_mode and not refit else ""
        return {**fitted, "source": f"fitted by sve evaluate on the validation split{why}"}
    if stored and stored.get("method") == "temperature":
        return {**stored, "source": "fitted by sve train on the validation split"}
    reason = "eval.calibration: none" if stored else "the bank predates calibration (use --temperature to fit one)"
    return {"method": "none", "temperature": 1.0, "source": reason}
