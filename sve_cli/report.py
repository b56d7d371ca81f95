"""Evaluation reports: `report.json` (every number), `report.md` (the same numbers for a person),
`reliability.png`, `risk_coverage.png`, one OOD score histogram per set, and optionally
`predictions.safetensors` (every member's raw logits, and the temperature) so anyone can recompute any number; and the
abstention thresholds fitted on validation, `RUN/thresholds.json`, that `sve predict` applies.
All written atomically.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import torch

from sve_cli import __version__, conformal
from sve_cli.writing import atomic_path, save_safetensors, write_json
from sve_cli.evaluate import Evaluation
from sve_cli.vocabulary import METRICS
from sve_cli.metrics import CONVENTIONS, Prediction, equal_width_bins
from sve_cli.outputs import REPORT, check_output, output_lock, tool_files
from sve_cli.selective import risk_coverage


def report_dict(evaluation: Evaluation) -> dict:
    metadata = evaluation.metadata
    return {
        "tool": f"sve {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(evaluation.run),
        "model": {"base_model": metadata["base_model"], "method": metadata.get("method"),
                  "members": metadata["members"], "decomposition_fingerprint": metadata["decomposition_fingerprint"],
                  "best_step": metadata.get("step")},
        "data": {"in_distribution": evaluation.data_name, "sizes": evaluation.sizes,
                 "label_names": metadata["label_names"], "ood_sources": evaluation.ood_sources},
        "conventions": {**CONVENTIONS, "bins": evaluation.bins, "combine": evaluation.combine},
        "metrics": evaluation.metrics,
        "raw_metrics": evaluation.raw_metrics,
        "calibration": evaluation.calibration,
        "selective": evaluation.selective,
        "conformal": evaluation.conformal,
        "conformal_by_class": evaluation.conformal_by_class,
        "ood": evaluation.ood,
    }


def markdown(report: dict) -> str:
    metrics, members = report["metrics"], report["model"]["members"]
    lines = [f"# sve evaluation — {report['run']}", "",
             f"Model: `{report['model']['base_model']}`, method `{report['model']['method']}`, M = {members}. "
             f"In-distribution data: {report['data']['in_distribution']} "
             f"({report['data']['sizes']['in_distribution']} examples).", "",
             f"Calibration: {_calibration_words(report['calibration'])}", "",
             "| metric | calibrated | raw |", "| --- | --- | --- |"]
    raw = report["raw_metrics"]
    lines += [f"| {metric.heading} | {metric.format(metrics[metric.key])} | {metric.format(raw[metric.key])} |"
              for metric in METRICS]
    lines.append("| member accuracy (%) | " + ", ".join(f"{100 * a:.2f}" for a in metrics["member_accuracy"]) + " | "
                 + ", ".join(f"{100 * a:.2f}" for a in raw["member_accuracy"]) + " |")
    if "per_member_then_pool" in report["calibration"]:
        other = report["calibration"]["per_member_then_pool"]
        lines += ["", f"Each member calibrated alone, then pooled (the alternative): Acc {100 * other['accuracy']:.2f}%, "
                  f"NLL {other['nll']:.4f}, Brier {other['brier']:.4f}, ECE {100 * other['ece']:.2f}%."]
    lines += ["", "Selective prediction (answer the surest share, abstain on the rest; AURC: lower is better):", "",
              "| score | AURC | " + " | ".join(f"acc. at {100 * float(c):.0f}% coverage (%)"
                                              for c in next(iter(report["selective"].values()))["accuracy_at_coverage"])
              + " |", "| --- | --- |" + " --- |" * len(next(iter(report["selective"].values()))["accuracy_at_coverage"])]
    lines += [f"| {score} | {v['aurc']:.4f} | " + " | ".join(f"{100 * a:.2f}" for a in v["accuracy_at_coverage"].values())
              + " |" for score, v in report["selective"].items()]
    if report.get("conformal"):
        lines += _conformal_lines(report, report["data"]["label_names"])
    for name, scores in report["ood"].items():
        lines += ["", f"OOD set `{name}` ({report['data']['sizes'][f'ood.{name}']} examples):", "",
                  "| score | AUROC (%) | AUPR (%) | FPR@95%TPR (%) |", "| --- | --- | --- | --- |"]
        lines += [f"| {score} | {100 * v['auroc']:.2f} | {100 * v['aupr']:.2f} | {100 * v['fpr_at_95_tpr']:.2f} |"
                  for score, v in scores.items()]
    if members == 1 and report["ood"]:
        lines += ["", "mutual_information is not reported: it needs an ensemble (M > 1)."]
    lines += ["", "Conventions:", ""] + [f"- {key}: {text}" for key, text in report["conventions"].items()]
    return "\n".join(lines) + "\n"


def _conformal_lines(report: dict, label_names: list[str]) -> list[str]:
    """The conformal tables of report.md, with how to read a set and what the measured coverage should be."""
    examples = next(iter(next(iter(report["conformal"].values())).values()))["calibration_examples"]
    header = ["| level | score | coverage (%) | expected 95% range (%) | mean set size | singletons (%) | empty (%) "
              "| lowest class coverage (%) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def rows(table: dict) -> list[str]:
        return [f"| {level} | {score} | {100 * v['coverage']:.2f} | {100 * v['expected_coverage_95'][0]:.1f}–"
                f"{100 * v['expected_coverage_95'][1]:.1f} | {v['mean_set_size']:.3f} | {100 * v['singletons']:.1f} "
                f"| {100 * v['empty']:.1f} | {100 * v['lowest_class_coverage']:.2f} |"
                for level, scores in table.items() for score, v in scores.items()]

    lines = ["", f"Conformal prediction sets (thresholds fitted on {examples} validation examples; a set holds the "
             "true label with probability ≥ the level, on average over inputs). One label: a confident answer; "
             "several: the labels the ensemble cannot tell apart at that level; empty (lac only): no label is "
             "plausible enough — refer the input rather than answer it. lac gives the smallest sets, aps/raps grow "
             "with the ensemble's doubt and are never empty; with ≳ 10 classes raps keeps sets short. The expected "
             "range is where the test coverage falls 95% of the time if the guarantee holds (beta-binomial).", "",
             *header, *rows(report["conformal"])]
    def uncalibrated(table: dict) -> str:
        """The names of the classes some level of `table` could not calibrate, or ""."""
        found = sorted({c for scores in table.values() for v in scores.values() for c in v.get("uncalibrated_classes", [])})
        return ", ".join(label_names[c] if c < len(label_names) else str(c) for c in found)

    if names := uncalibrated(report["conformal"]):
        lines += ["", f"**Warning:** the validation split holds no example of {names}: the sets are not calibrated "
                  "for it (see its test coverage in report.json, coverage_per_class)."]
    if report.get("conformal_by_class"):
        lines += ["", "Class-conditional (Mondrian) sets, `sve predict --conformal-mode class`: one threshold per "
                  "class, so coverage ≥ the level within every class (the expected range is the least covered "
                  "class's):", "", *header, *rows(report["conformal_by_class"])]
        if names := uncalibrated(report["conformal_by_class"]):
            lines += ["", f"Too few validation examples of {names} for some levels: no finite threshold there, so "
                      "the label is in every class-conditional set at those levels."]
    return lines


def _calibration_words(calibration: dict) -> str:
    if calibration["method"] != "temperature":
        return f"none ({calibration['source']}): calibrated = raw."
    return (f"temperature T = {calibration['temperature']:.4f}, {calibration['source']} "
            f"({calibration['examples']} examples); every member's logits are divided by T.")


def _bin_accuracy(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: accuracy (NaN where empty) and the number of examples."""
    confidence, predicted = probs.max(dim=-1)
    assignment = equal_width_bins(confidence, bins)
    counts = torch.bincount(assignment, minlength=bins)
    correct = torch.zeros(bins, dtype=torch.float64).index_add_(0, assignment, (predicted == labels).double())
    return torch.where(counts > 0, correct / counts.clamp_min(1), torch.nan), counts


def reliability_png(path: Path, probs: torch.Tensor, labels: torch.Tensor, bins: int, ece_value: float, title: str,
                    raw: tuple[torch.Tensor, float] | None = None) -> None:
    """Accuracy per confidence bin (bars) for `probs`; with `raw` (raw probabilities, their ECE) the raw
    curve too, so a calibrated report shows what calibration changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy, counts = _bin_accuracy(probs, labels, bins)
    edges = torch.linspace(0, 1, bins + 1).numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), dpi=100, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    label = "calibrated" if raw is not None else "accuracy"
    top.bar(centres, accuracy.nan_to_num(0).numpy(), width=1 / bins, edgecolor="black", color="#4c72b0", label=label)
    heading = f"ECE {100 * ece_value:.2f}% ({bins} bins)"
    if raw is not None:
        raw_accuracy, _ = _bin_accuracy(raw[0], labels, bins)
        top.plot(centres, raw_accuracy.numpy(), "o-", color="#c44e52", label=f"raw (ECE {100 * raw[1]:.2f}%)")
        heading = f"calibrated ECE {100 * ece_value:.2f}%, raw {100 * raw[1]:.2f}% ({bins} bins)"
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"{title}\n{heading}")
    top.legend(loc="upper left")
    bottom.bar(centres, counts.numpy(), width=1 / bins, edgecolor="black", color="#dd8452")
    for x, count in zip(centres, counts.tolist()):
        if count:
            bottom.text(x, count, str(count), ha="center", va="bottom", fontsize=6)
    bottom.set_xlabel("confidence (top-1)")
    bottom.set_ylabel("examples")
    figure.tight_layout()
    save_figure(figure, path)


def risk_coverage_png(path: Path, prediction: Prediction, labels: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    correct = prediction.probs.argmax(-1) == labels
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    for name, scores in prediction.scores.items():
        coverage, risk = risk_coverage(scores, correct)
        axis.plot(coverage.numpy(), risk.numpy(), label=f"{name} (AURC {float(risk.mean()):.4f})")
    axis.axhline(1 - float(correct.double().mean()), color="grey", linestyle="--", label="no abstention")
    axis.set_xlabel("coverage (share of inputs answered)")
    axis.set_ylabel("risk (error rate among answered)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def conformal_png(path: Path, evaluation: Evaluation, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    for score, points in conformal.curve(evaluation.validation, evaluation.validation_labels, evaluation.prediction,
                                         evaluation.labels).items():
        axis.plot([c for c, _ in points], [s for _, s in points], marker=".", label=score)
    axis.set_xlabel("coverage on the test split\n(levels 0.50–0.99 fitted on validation)")
    axis.set_ylabel("mean prediction-set size")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def histogram_png(path: Path, in_scores: dict, out_scores: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(in_scores), figsize=(4 * len(in_scores), 3.2), dpi=100, squeeze=False)
    for axis, score in zip(axes[0], in_scores):
        both = torch.cat([in_scores[score], out_scores[score]]).double()
        low, high = float(both.min()), float(both.max())
        if high - low < 1e-9 * max(1.0, abs(high)):  # (nearly) one value: numpy cannot cut it into 30 bins
            low, high = low - 1e-3, high + 1e-3
        for scores, label in ((in_scores[score], "in-distribution"), (out_scores[score], f"OOD: {name}")):
            axis.hist(scores.numpy(), bins=30, range=(low, high), alpha=0.6, density=True, label=label)
        axis.set_title(score)
        axis.set_xlabel("score (higher = more OOD)")
    axes[0][0].legend()
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def write_report(evaluation: Evaluation, directory: Path, save_predictions: bool) -> dict:
    """Write every file of the report; `report.json`, written last, lists them (an earlier report's
    files that this one does not write again are removed, so the directory holds one report)."""
    directory.mkdir(parents=True, exist_ok=True)
    earlier = tool_files(directory, "report.json") or set()
    report = report_dict(evaluation)
    written = {"report.md", "reliability.png", "risk_coverage.png", "conformal.png",
               *(f"ood_{name}.png" for name in evaluation.ood_predictions),
               *(["predictions.safetensors"] if save_predictions else [])}
    # sve's marker first: a report cut short (a full disk, a kill) is still recognised as sve's own, and
    # `--overwrite` replaces it; the complete report.json replaces this one last
    write_json(directory / "report.json", {"tool": report["tool"], "complete": False,
                                           "files": sorted(written | earlier | {"report.json"})})
    with atomic_path(directory / "report.md") as temporary:
        temporary.write_text(markdown(report), encoding="utf-8")
    prediction = evaluation.prediction
    calibrated = evaluation.calibration["method"] == "temperature"
    reliability_png(directory / "reliability.png", prediction.probs, evaluation.labels, evaluation.bins,
                    evaluation.metrics["ece"],
                    f"{Path(evaluation.run).name}: {report['model']['method']} M={report['model']['members']}",
                    (evaluation.raw.probs, evaluation.raw_metrics["ece"]) if calibrated else None)
    risk_coverage_png(directory / "risk_coverage.png", prediction, evaluation.labels,
                      f"{Path(evaluation.run).name}: risk–coverage")
    conformal_png(directory / "conformal.png", evaluation, f"{Path(evaluation.run).name}: conformal sets")
    for name, outside in evaluation.ood_predictions.items():
        histogram_png(directory / f"ood_{name}.png", prediction.scores, outside.scores, name)
    if save_predictions:  # every member's raw logits and the temperature: any number can be recomputed
        temperature = evaluation.temperature
        tensors = {"logits": evaluation.raw.logits.float(), "labels": evaluation.labels,
                   "validation.logits": (evaluation.validation.logits * temperature).float(),
                   "validation.labels": evaluation.validation_labels}
        tensors.update({f"ood.{name}.logits": (p.logits * temperature).float()
                        for name, p in evaluation.ood_predictions.items()})
        save_safetensors(directory / "predictions.safetensors", tensors,
                         {"sve.label_names": json.dumps(report["data"]["label_names"]), "sve.combine": evaluation.combine,
                          "sve.temperature": json.dumps(temperature)})
    report["files"] = sorted(written | {"report.json"})
    write_json(directory / "report.json", report)
    for stale in earlier - set(report["files"]):
        (directory / stale).unlink(missing_ok=True)
    return report


def fitted_payloads(evaluation: Evaluation) -> tuple[dict, dict]:
    """What `RUN/thresholds.json` (abstention, for `sve predict --abstain-coverage` / `--abstain-risk`) and
    `RUN/conformal.json` (prediction sets, for `sve predict --conformal`) hold: fitted on validation, tied to
    the bank they were fitted for (its sha256) and to the way members were combined (`rundir.write_fitted`
    writes them)."""
    common = {"tool": f"sve {__version__}", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "bank": evaluation.bank_fingerprint, "fitted_on": "validation",
              "examples": evaluation.sizes["validation"], "combine": evaluation.combine,
              "temperature": evaluation.temperature}  # fitted on calibrated scores: predict must calibrate alike
    thresholds = {**common, "rule": "accept an input when its score is at most the threshold (higher score = less "
                  "sure)", "scores": evaluation.thresholds}
    sets = {**common, "rule": "a label is in the set when its score is at most the threshold (null: every label); "
            "the set holds the true label with probability at least the level",
            "scores": {score: {level: None if math.isinf(value) else value for level, value in levels.items()}
                       for score, levels in evaluation.conformal_thresholds.items()},
            "class_rule": "class-conditional (--conformal-mode class): label y is in the set when its score is at "
            "most y's own threshold; the set holds the true label with probability at least the level within every class",
            "class_scores": {score: {level: [None if math.isinf(v) else v for v in values]
                                     for level, values in levels.items()}
                             for score, levels in evaluation.class_thresholds.items()}}
    return thresholds, sets


def write_report_once(evaluation: Evaluation, directory: Path, save_predictions: bool, overwrite: bool,
                      inputs: list) -> dict:
    """`write_report` under the output rule: the report's lock held, the rule checked again inside it (another
    `sve evaluate` may have written there meanwhile)."""
    with output_lock(directory):
        check_output(directory, REPORT, overwrite, inputs, option="--report")
        return write_report(evaluation, directory, save_predictions)
