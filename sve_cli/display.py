"""What the command line prints: rich tables of a decomposition, a memory plan, a run and an evaluation."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from sve_cli.vocabulary import CONFORMAL_SCORES, METRIC, METRICS, UNCERTAINTY_SCORES, VALIDATION_METRICS



def human(nbytes: float) -> str:
    """1.2 GB, 350.0 MB, 12 B (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def decomposition_plan(plan, out: Path) -> list:
    """`sve decompose --dry-run`: every target, then what would be written."""
    table = Table(title=f"{len(plan.targets)} targets in {plan.checkpoint.source}",
                  title_justify="left")
    for column in ("parameter", "shape", "k", "dtype", "factors"):
        table.add_column(column, justify="left" if column == "parameter" else "right")
    element_size = 8 if plan.precision == "float64" else 4
    for target in plan.targets:
        table.add_row(target.name, f"{target.out_features}×{target.in_features}", str(target.k),
                      target.dtype, human(target.factor_bytes(element_size)))
    items = [table, *plan_notes(plan)]
    items.append(f"would write {human(plan.total_size)} in {len(plan.shards)} shard(s) to {out} ({plan.precision})")
    return items


def plan_notes(plan) -> list[str]:
    """What a decomposition plan says besides its targets: inferred targets, and experts left frozen."""
    if not plan.inferred:
        return []
    from sve_cli.architectures import architecture, experts_note

    notes = [f"{plan.checkpoint.model_type} has no spec in sve: these targets were inferred (every linear layer of "
             "its transformer blocks); --targets narrows them"]
    family = architecture(plan.checkpoint)
    if family.fused:
        notes.append(experts_note(family) + "; the targets are its attention layers")
    return notes


def decomposition(model: str, plan, result, out: Path) -> Table:
    """`sve decompose`: what was decomposed, reused and written."""
    manifest = result.manifest
    table = Table(title=f"decomposition of {model}", show_header=False, title_justify="left")
    table.add_row("targets", f"{len(plan.targets)} ({len(result.computed)} decomposed, "
                  f"{len(result.reused)} reused)")
    table.add_row("shards", str(len(plan.shards)))
    table.add_row("cache size", human(manifest["total_size"]))
    table.add_row("max rel. error", f"{max(t['rel_error'] for t in manifest['targets']):.2e}")
    table.add_row("precision", manifest["precision"])
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("written to", str(out))
    return table


def memory_plan(recipe, estimate, device: str, capacity: int | None, notes: list[str]) -> Table:
    """`sve train --dry-run`: parameters, bytes, the estimated peak per rank, whether it fits, and the export."""
    ensemble, train = recipe.ensemble, recipe.train
    ranks = (f", per rank of {estimate.world} ({'fsdp: sharded' if estimate.sharded else 'ddp: replicated'})"
             if estimate.world > 1 else "")
    table = Table(title=f"{ensemble.method} M={ensemble.members} on {recipe.model.path}, {device}"
                  f"{' bf16' if train.precision == 'bf16' and device == 'cuda' else ' fp32'}{ranks}", show_header=False,
                  title_justify="left")
    table.add_row("trainable parameters", f"{estimate.trainable_parameters:,} "
                  f"({100 * estimate.trainable_parameters / estimate.base_parameters:.3f}% of the base)")
    table.add_row("frozen weights", human(estimate.frozen_weight_bytes))
    table.add_row("shared factors (U, Vh)", human(estimate.factor_bytes))
    table.add_row("trainable + grads + AdamW", human(estimate.trainable_bytes))
    table.add_row("activations", f"{human(estimate.activation_bytes)} (members per pass "
                  f"{train.members_per_pass or ensemble.members}, gradient checkpointing "
                  f"{'on' if train.gradient_checkpointing else 'off'})")
    table.add_row("runtime", human(estimate.runtime_bytes))
    table.add_row("estimated peak", human(estimate.peak_bytes))
    table.add_row("evaluate / predict", f"{human(estimate.inference_bytes)} (plus at most the eval cache budget)")
    if capacity is None:
        table.add_row("fits", f"unknown (no {device} memory to measure here: pass --memory, e.g. 80GB)")
    else:
        verdict = "yes" if estimate.fits else "no"
        table.add_row("fits", f"{verdict}: {human(capacity)} available, "
                      f"{100 * (1 - estimate.peak_bytes / capacity):.0f}% headroom (10% wanted)")
    for suggestion in estimate.suggestions:
        table.add_row("to fit", suggestion)
    for note in notes:
        table.add_row("export", note.removeprefix("export: "))
    return table


class StepLog:
    """Plain progress lines for a log that is not a terminal (rich draws its bar only on a TTY), as the
    Hugging Face Trainer's logs: the first step, then every `every` seconds, and the last step."""

    def __init__(self, enabled: bool, every: float = 30.0):
        self.enabled, self.every = enabled, every
        self.started = self.last = time.perf_counter()

    def __call__(self, info: dict) -> str | None:
        now = time.perf_counter()
        if not self.enabled or not (info["step"] in (1, info["total"]) or now - self.last >= self.every):
            return None
        self.last = now
        per_step = (now - self.started) / info["step"]
        rates = " ".join(f"{name} {lr:.2e}" for name, lr in info["learning_rates"].items())
        return (f"step {info['step']}/{info['total']} loss {info['loss']:.4f} acc {info['accuracy']:.3f} lr {rates} "
                f"{per_step:.2f} s/step elapsed {_clock(now - self.started)} eta {_clock(per_step * (info['total'] - info['step']))}")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def run_summary(out: Path, recipe, state: dict) -> Table:
    """`sve train`'s last table: the best step and its validation numbers."""
    best = state["history"][[h["step"] for h in state["history"]].index(state["best_step"])]
    table = Table(title=f"run {out}", show_header=False, title_justify="left")
    table.add_row("best step", f"{state['best_step']} of {state['total_steps']} ({recipe.eval.metric})")
    if recipe.task.type == "generation":
        table.add_row(f"{recipe.eval.split} target-token Acc (%)", METRIC["accuracy"].format(best["accuracy"]))
        table.add_row(f"{recipe.eval.split} target-token NLL", f"{best['nll']:.4f} (members alone: {best['member_nll']:.4f})")
        if "rouge_l" in best:
            table.add_row(f"{recipe.eval.split} answers' ROUGE-L (%)", METRIC["rouge_l"].format(best["rouge_l"]))
    for key in VALIDATION_METRICS if recipe.task.type != "generation" else ():
        table.add_row(f"{recipe.eval.split} {METRIC[key].heading} (raw)", METRIC[key].format(best[key]))
    if recipe.eval.calibration == "temperature" and recipe.task.type != "generation":
        table.add_row("temperature", f"{best['temperature']:.4f} (fitted on {recipe.eval.split}; evaluate, predict "
                      "and exports use it)")
    from sve_cli.rundir import BANK

    table.add_row("bank", str(out / BANK))
    return table


def evaluation(runs: list[Path], reports: list[dict]) -> Table:
    """`sve evaluate`'s table: one column per run; calibrated numbers, then the raw ones."""
    table = Table(title="in-distribution: " + reports[0]["data"]["in_distribution"], title_justify="left")
    table.add_column("metric")
    for run, result in zip(runs, reports):
        table.add_column(f"{run.name}\n{result['model']['method']} M={result['model']['members']}", justify="right")
    for metric in METRICS:
        table.add_row(metric.heading, *[metric.format(r["metrics"][metric.key]) for r in reports])
    table.add_row("temperature", *[f"{r['calibration']['temperature']:.3f}" if r["calibration"]["method"] == "temperature"
                                   else "none (raw)" for r in reports])
    for key in VALIDATION_METRICS:
        table.add_row(f"raw {METRIC[key].heading}", *[METRIC[key].format(r["raw_metrics"][key]) for r in reports])
    for score in UNCERTAINTY_SCORES:
        table.add_row(f"AURC {score}", *[f"{r['selective'][score]['aurc']:.4f}" if score in r["selective"] else "—"
                                         for r in reports])
    for score in CONFORMAL_SCORES:
        if all(score in r["conformal"]["0.9"] for r in reports):
            table.add_row(f"90% sets ({score}): coverage (%) / mean size",
                          *[f"{100 * r['conformal']['0.9'][score]['coverage']:.2f} / "
                            f"{r['conformal']['0.9'][score]['mean_set_size']:.2f}" for r in reports])
    table.add_row("acc. at 90% coverage (%, entropy)",
                  *[f"{100 * r['selective']['entropy']['accuracy_at_coverage']['0.9']:.2f}" for r in reports])
    for name in reports[0]["ood"]:
        for score in UNCERTAINTY_SCORES:
            table.add_row(f"OOD {name} AUROC {score} (%)",
                          *[f"{100 * r['ood'][name][score]['auroc']:.2f}" if score in r["ood"][name] else "—" for r in reports])
    return table
