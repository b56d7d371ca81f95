"""`sve predict`: new inputs through a trained ensemble — label, probabilities, uncertainty, and
whether to abstain.

The ensemble comes from a run directory (its recipe and best bank, or another bank with `bank=`)
or from a Σ bank file alone: banks carry the resolved recipe in their metadata, and an exported
bank also the run's abstention thresholds, so the base model and one small file are enough.
Inputs are read, predicted and written chunk by chunk (memory does not grow with the input); the
output (jsonl, csv or parquet, by extension) goes to a temporary name and is renamed when whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch

from sve_cli.bank import read_bank_metadata
from sve_cli.data import iter_chunks, unlabelled_examples
from sve_cli import __version__
from sve_cli.errors import SveError
from sve_cli import conformal
from sve_cli.metrics import Prediction, temperature_of
from sve_cli.outputs import PREDICTIONS, check_output, output_lock
from sve_cli.pipeline import Pipeline, load_ensemble
from sve_cli.distributed import Parallel, for_inference
from sve_cli.inference import predict
from sve_cli.recipe import Recipe
from sve_cli.rundir import CONFORMAL, THRESHOLDS, open_run, read_fitted
from sve_cli.selective import TARGET_RISKS, THRESHOLD_COVERAGES
from sve_cli.writing import atomic_path, journal

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CHUNK_ROWS = 1024


@dataclass
class Predictor:
    pipeline: Pipeline
    model: torch.nn.Module
    label_names: list[str]
    bank: Path
    thresholds: dict | None  # thresholds.json's content (or the bank's embedded copy), when present
    conformal: dict | None  # conformal.json's content (or the bank's embedded copy), when present
    calibration: dict | None = None  # the bank's: the temperature fitted at the end of training
    parallel: Parallel = field(default_factory=Parallel)  # the ranks of torchrun, when it started this

    @property
    def recipe(self) -> Recipe:
        return self.pipeline.recipe

    def temperature(self, member: int | None = None, raw: bool = False) -> float:
        """What the logits are divided by: the ensemble's (or member `member`'s) fitted temperature; 1 with `raw`."""
        return 1.0 if raw else temperature_of(self.calibration, member)

    def probability_note(self, member: int | None = None, raw: bool = False) -> str:
        """Which probabilities the output holds, in words (predict's summary line)."""
        if raw:
            return "raw probabilities (--raw)"
        if (self.calibration or {}).get("method") != "temperature":
            why = "eval.calibration: none" if self.calibration else "a bank from before calibration"
            return f"raw probabilities ({why})"
        who = f"member {member}'s" if member is not None else "the ensemble's"
        return (f"probabilities calibrated by {who} temperature {self.temperature(member):.4g}, fitted on "
                f"{self.calibration.get('examples')} {self.calibration.get('split', 'validation')} examples")


def open_predictor(source: Path, bank: Path | None = None) -> Predictor:
    """A run directory (with its own bank or `bank`), or a Σ bank file that carries its recipe."""
    source = Path(source)
    if source.is_dir():
        recipe, bank = open_run(source, bank)
        thresholds, sets = read_fitted(source / THRESHOLDS, bank), read_fitted(source / CONFORMAL, bank)
    elif source.is_file():
        bank, metadata = source, read_bank_metadata(source)
        if "recipe" not in metadata:
            raise SveError(f"{source} does not carry its recipe (older banks do not); pass its run directory")
        recipe = Recipe.model_validate(metadata["recipe"])
        if recipe.model.decomposition and not Path(recipe.model.decomposition).exists():  # another machine
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"decomposition": None})})
        thresholds, sets = metadata.get("thresholds"), metadata.get("conformal")
    else:
        raise SveError(f"{source} is neither a run directory nor a Σ bank file")
    pipeline, model, metadata = load_ensemble(recipe, bank)
    parallel = for_inference(model, recipe.train.parallelism)
    return Predictor(pipeline, model, list(metadata["label_names"]), bank, thresholds, sets,
                     metadata.get("calibration"), parallel)


def _fitted_alike(fitted: dict, temperature: float, what: str) -> None:
    """Thresholds fitted on calibrated scores hold only for probabilities calibrated the same way."""
    theirs = fitted.get("temperature", 1.0)
    if not isinstance(theirs, (int, float)) or abs(theirs - temperature) > 1e-9 * max(1.0, abs(temperature)):
        advice = ("drop --raw" if temperature == 1.0 else
                  "run `sve evaluate` on the run again to fit them on the calibrated probabilities")
        raise SveError(f"the {what} were fitted on probabilities at temperature {theirs}, these are at temperature "
                       f"{temperature:g}: {advice}")


def check_risk_level(risk: float | None) -> None:
    """Refuse an `--abstain-risk` that `sve evaluate` fits no threshold for (before any model is loaded)."""
    if risk is not None and not any(math.isclose(risk, level) for level in TARGET_RISKS):
        raise SveError(f"--abstain-risk {risk:g} is not a fitted level: `sve evaluate` fits "
                       f"{', '.join(f'{level:g}' for level in TARGET_RISKS)} (or pass --abstain-threshold)")


def abstain_threshold(predictor: Predictor, score: str, coverage: float | None, risk: float | None,
                      threshold: float | None, raw: bool = False) -> tuple[float | None, str]:
    """The score above which to abstain, and a sentence saying where it comes from."""
    if threshold is not None:
        return threshold, f"abstaining when {score} > {threshold:g} (given)"
    if coverage is None and risk is None:
        return None, "no abstention threshold (every input is answered)"
    fitted = predictor.thresholds
    if fitted is None or score not in fitted["scores"]:
        raise SveError(f"no fitted {score} thresholds for this ensemble: run `sve evaluate` on the run first "
                       "(it fits them on the validation split), or pass --abstain-threshold")
    combine_how = predictor.recipe.eval.combine
    if fitted.get("combine") != combine_how:
        raise SveError(f"the thresholds were fitted with members combined by {fitted.get('combine')}, this run "
                       f"combines them by {combine_how} (eval.combine): run `sve evaluate` again without --combine")
    _fitted_alike(fitted, predictor.temperature(raw=raw), "abstention thresholds")
    where = f"fitted on {fitted.get('examples')} validation examples by `sve evaluate` ({str(fitted.get('created'))[:10]})"
    try:
        fitted_score = fitted["scores"][score]
        if coverage is not None:
            key = f"{coverage:g}"
            if key not in fitted_score["coverage"]:
                raise SveError(f"--abstain-coverage {coverage:g} is not a fitted level (0.5 … 0.99 in steps of "
                               f"0.01, and {THRESHOLD_COVERAGES[-1]})")
            value = _number(fitted_score["coverage"][key])
            return value, f"abstaining when {score} > {value:.6g}: the {100 * coverage:g}% coverage threshold, {where}"
        check_risk_level(risk)
        entry = fitted_score["risk"].get(f"{risk:g}")
        if entry is None:
            known = ", ".join(fitted_score["risk"]) or "none"
            raise SveError(f"--abstain-risk {risk:g}: no fitted threshold reaches that risk on validation "
                           f"(fitted risks: {known})")
        value, answered = _number(entry["threshold"]), _number(entry["coverage"])
    except (KeyError, TypeError, AttributeError):
        raise SveError("the fitted thresholds are damaged (not what `sve evaluate` writes); run it again") from None
    return value, (f"abstaining when {score} > {value:.6g}: validation risk ≤ {100 * risk:g}% at "
                   f"{100 * answered:.1f}% coverage, {where}")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SveError(f"a fitted threshold is {value!r}, not a number: the thresholds are damaged; "
                       "run `sve evaluate` on the run again")
    return float(value)


def conformal_threshold(predictor: Predictor, level: float, score: str, raw: bool = False,
                        by_class: bool = False) -> tuple[float | list[float], str]:
    """The conformal threshold of `score` at coverage `level` (`by_class`: one per class, the class-conditional
    sets), and a sentence saying where it comes from."""
    fitted = predictor.conformal
    if fitted is None:
        raise SveError("no conformal thresholds for this ensemble: run `sve evaluate` on the run first (it fits "
                       "them on the validation split)")
    if fitted.get("combine") != predictor.recipe.eval.combine:
        raise SveError(f"the conformal thresholds were fitted with members combined by {fitted.get('combine')}, "
                       f"this run combines them by {predictor.recipe.eval.combine}: run `sve evaluate` again")
    _fitted_alike(fitted, predictor.temperature(raw=raw), "conformal thresholds")
    table = fitted.get("class_scores" if by_class else "scores")
    if by_class and not isinstance(table, dict):
        raise SveError("no class-conditional thresholds for this ensemble: run `sve evaluate` on the run again "
                       "(this sve fits them)")
    levels = table.get(score) if isinstance(table, dict) else None
    if not isinstance(levels, dict) or f"{level:g}" not in levels:
        known = ", ".join(levels) if isinstance(levels, dict) else "none"
        raise SveError(f"--conformal {level:g} with --conformal-score {score} was not fitted (fitted levels: {known})")
    value = levels[f"{level:g}"]
    fitted_on = f"fitted on {fitted.get('examples')} validation examples by `sve evaluate` ({str(fitted.get('created'))[:10]})"
    if by_class:
        if not isinstance(value, list) or len(value) != len(predictor.label_names):
            raise SveError("the fitted class-conditional thresholds are damaged (not what `sve evaluate` writes); run it again")
        thresholds = [math.inf if v is None else _number(v) for v in value]
        open_classes = [name for name, v in zip(predictor.label_names, value) if v is None]
        return thresholds, (f"class-conditional {score} sets at {100 * level:g}% coverage within every class, {fitted_on}"
                            + (f"; too few validation examples of {', '.join(open_classes)}: always in the set"
                               if open_classes else ""))
    threshold = math.inf if value is None else _number(value)
    return threshold, (f"{score} sets at {100 * level:g}% coverage: threshold "
                       f"{'none (every label)' if value is None else f'{threshold:.6g}'}, {fitted_on}")


def predict_rows(predictor: Predictor, data: str, member: int | None, batch_size: int, score: str,
                 threshold: float | None, on_rows: Callable[[int], None] | None = None,
                 sets: tuple[str, float | list[float]] | None = None, cache_budget: str | None = None,
                 raw: bool = False) -> Iterator[list[dict]]:
    """One list of output rows per chunk of the input, with calibrated probabilities (the run's fitted
    temperature; `raw`: none); with `sets` (conformal score, threshold) each row also gets its prediction set."""
    task, names = predictor.recipe.task, predictor.label_names
    members = predictor.model.members
    if member is not None and not 0 <= member < members:
        raise SveError(f"--member {member} is out of range: the ensemble has {members} member(s)")
    if member is not None and sets is not None:
        raise SveError("--conformal sets were fitted for the whole ensemble, not for one --member")
    if score == "mutual_information" and (members == 1 or member is not None):
        raise SveError("--score mutual_information needs the whole ensemble (more than one member)")
    first = 0
    for table in iter_chunks(data, task.config, CHUNK_ROWS):
        if len(table.frame) == 0:
            continue
        examples, labels = unlabelled_examples(table, task, names, data)
        logits = predict(predictor.model, predictor.pipeline.encode(examples), batch_size, predictor.parallel,
                         members_per_pass=predictor.recipe.train.members_per_pass,
                         budget=cache_budget or predictor.recipe.eval.cache_budget)  # [n, M, C]
        if member is not None:
            logits = logits[:, member:member + 1]
        logits = logits.double() / predictor.temperature(member, raw)
        prediction = Prediction.of(logits, predictor.recipe.eval.combine)  # members combined as the run says
        probs, scores = prediction.probs, prediction.scores  # [n, C]
        confidence = probs.max(-1).values
        chosen = scores[score]
        in_set = conformal.prediction_sets(probs, *sets).tolist() if sets is not None else None
        ids = table.frame["id"].tolist() if "id" in table.frame.columns else range(first, first + len(probs))
        rows = []
        for index, row_id in enumerate(ids):
            row = {"id": row_id.item() if hasattr(row_id, "item") else row_id,
                   "prediction": names[int(probs[index].argmax())],
                   "probabilities": {name: float(p) for name, p in zip(names, probs[index])},
                   "confidence": float(confidence[index]), "entropy": float(scores["entropy"][index]),
                   "mutual_information": float(scores["mutual_information"][index]) if prediction.members > 1 else None,
                   "members": [names[int(c)] for c in prediction.member_probs[index].argmax(-1)]}
            if threshold is not None:
                row["abstain"] = bool(chosen[index] > threshold)
            if sets is not None:
                row["prediction_set"] = [name for name, kept in zip(names, in_set[index]) if kept]
                row["set_size"] = len(row["prediction_set"])
            if labels is not None:
                row["label"] = names[int(labels[index])]
            rows.append(row)
        first += len(rows)
        on_rows and on_rows(len(rows))
        yield rows


def _flat(row: dict) -> dict:
    """A row for a table format: one column per class probability, members (and the set) joined."""
    flat = {key: value for key, value in row.items() if key not in ("probabilities", "members", "prediction_set")}
    flat.update({f"p_{name}": p for name, p in row["probabilities"].items()})
    flat["members"] = ",".join(row["members"])
    if "prediction_set" in row:
        flat["prediction_set"] = ",".join(row["prediction_set"])
    return flat


def _tally(summary: dict, rows: list[dict]) -> None:
    for row in rows:
        summary["rows"] += 1
        summary["abstained"] += int(row.get("abstain", False))
        if "label" in row and not row.get("abstain", False):
            summary["answered_labelled"] += 1
            summary["answered_correct"] += int(row["label"] == row["prediction"])


def check_predictions_output(out: Path, overwrite: bool, inputs: list[Path | str | None]) -> None:
    """Before any work: a .jsonl/.csv/.parquet name that is not an input and, when it exists, is an
    earlier `sve predict` output that `--overwrite` may replace."""
    if FORMATS.get(out.suffix.lower()) is None:
        raise SveError(f"--out {out}: use a .jsonl, .csv or .parquet file")
    check_output(out, PREDICTIONS, overwrite, inputs)


def write_predictions(chunks: Iterator[list[dict]], out: Path, overwrite: bool,
                      inputs: list[Path | str | None] = ()) -> dict:
    """Stream the rows into `out` (format by extension) atomically; returns a summary."""
    check_predictions_output(out, overwrite, inputs)
    kind = FORMATS[out.suffix.lower()]
    summary = {"rows": 0, "abstained": 0, "answered_correct": 0, "answered_labelled": 0}
    with output_lock(out):
        with atomic_path(out) as temporary:
            check_output(out, PREDICTIONS, overwrite, inputs)  # again: another writer may have finished meanwhile
            if kind == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                writer = None
                for rows in chunks:
                    _tally(summary, rows)
                    batch = pa.Table.from_pylist([_flat(row) for row in rows])
                    batch = batch.replace_schema_metadata({"sve": f"sve {__version__} predictions"})
                    writer = writer or pq.ParquetWriter(str(temporary), batch.schema)
                    writer.write_table(batch.cast(writer.schema))
                if writer is not None:
                    writer.close()
            else:
                with open(temporary, "w", encoding="utf-8", newline="") as handle:
                    for rows in chunks:
                        header = summary["rows"] == 0
                        _tally(summary, rows)
                        if kind == "jsonl":
                            handle.writelines(json.dumps(row) + "\n" for row in rows)
                        else:
                            pd.DataFrame([_flat(row) for row in rows]).to_csv(handle, header=header, index=False)
            if summary["rows"] == 0:
                raise SveError("the input holds no rows: nothing to predict")
        journal(out, "outputs")  # a CSV or JSONL cannot carry sve's marker inside
    return summary


def answered_accuracy(summary: dict) -> float | None:
    labelled = summary["answered_labelled"]
    return summary["answered_correct"] / labelled if labelled else None


def coverage_of(summary: dict) -> float:
    return 1 - summary["abstained"] / summary["rows"] if summary["rows"] else math.nan
