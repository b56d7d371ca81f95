"""The `sve` command line: a thin Typer layer over the library.

Each command parses its options, calls one library function and prints with rich. User errors
(`SveError`, pydantic validation errors) become one red line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import math
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import click
import typer
from rich.progress import BarColumn, TextColumn

from sve_cli import __version__, display
from sve_cli.console import (console, is_peer_lost, one_line, out_console, print_error, print_memory_plan,
                             print_time_estimate, progress_bar, show_library_notices, status_column)
from sve_cli.launcher import PEER_LOST
from sve_cli.errors import SveError
from sve_cli.vocabulary import CONFORMAL_SCORES, EVAL_METRICS, METRIC, UNCERTAINTY_SCORES

app = typer.Typer(
    name="sve",
    help="Singular Value Ensembles: calibrated uncertainty for any pretrained transformer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Precision(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Combine(str, Enum):
    probs = "probs"
    logits = "logits"


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    sigma_bank = "sigma-bank"


Score = Enum("Score", {name: name for name in UNCERTAINTY_SCORES}, type=str)  # the library's own tuples
ConformalScore = Enum("ConformalScore", {name: name for name in CONFORMAL_SCORES}, type=str)


class ConformalMode(str, Enum):
    marginal = "marginal"
    class_ = "class"


class ExportDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _version(value: bool) -> None:
    if value:
        print(f"sve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Singular Value Ensembles: calibrated uncertainty for any pretrained transformer."""


@app.command(epilog="Example:  sve decompose builtin:minilm --targets attention --dry-run")
def decompose(
    model: str = typer.Argument(..., help="Checkpoint directory, .safetensors/.gguf file, builtin:minilm, "
                                "builtin:smollm2, a hub id, or one of the paper's models by name: llama-2-7b, "
                                "llama-2-13b, llama-2-70b, bert-base, dino-vits16, dinov2-vits14."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache directory (default: a folder named "
                                       "after the model in $SVE_HOME/decompositions)."),
    targets: Optional[str] = typer.Option(None, "--targets", help="Preset (all, attention, mlp, "
                                          "llama, bert, vit, …) or comma-separated globs; "
                                          "'!glob' excludes."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where the SVDs run (auto: cuda when present)."),
    dtype: Precision = typer.Option(Precision.float32, "--dtype", "--precision",
                                    help="dtype of the factors written (and of the SVD)."),
    max_shard_size: str = typer.Option("1GB", "--max-shard-size", help="Largest factors shard."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a cache of another model, target set or precision."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List targets and cache size; write nothing."),
) -> None:
    """Thin SVD of every targeted weight into a resumable U/S/Vh cache.

    Re-running continues an interrupted run and skips finished shards.
    """
    from sve_cli.writing import parse_size
    from sve_cli.decompose import decompose as run_decompose
    from sve_cli.decompose import plan_decomposition
    from sve_cli.factors import default_output

    with console.status(f"opening {model}…"):  # a GGUF file is dequantised here, once
        plan = plan_decomposition(model, targets, dtype.value, parse_size(max_shard_size), shapes_only=dry_run)
    out = out or default_output(model, targets)
    if dry_run:
        for item in display.decomposition_plan(plan, out):
            out_console.print(item)
        return

    for note in display.plan_notes(plan):
        out_console.print(note, soft_wrap=True, highlight=False)
    work = plan.work
    with progress_bar(BarColumn(), TextColumn("{task.percentage:>3.0f}%")) as progress:
        task = progress.add_task("fingerprinting sources", total=sum(work.values()))

        def on_target(target, reused: bool) -> None:
            verb = "reused" if reused else "decomposed"
            progress.update(task, advance=work[target.name], description=f"{verb} {target.module}")

        def on_wait() -> None:
            progress.console.print(f"waiting for another sve decompose writing to {out}…")

        result = run_decompose(plan, out, device=device.value, overwrite=overwrite, on_target=on_target,
                               on_wait=on_wait)

    out_console.print(display.decomposition(model, plan, result, out))


@app.command(epilog="Example:  sve train recipes/quickstart.yaml --set train.epochs=1")
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: runs/<recipe name>)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print parameters, bytes and the estimated peak "
                                 "memory, and whether it fits; train nothing."),
    device: Device = typer.Option(Device.auto, "--device", help="With --dry-run: the device to estimate for."),
    memory: Optional[str] = typer.Option(None, "--memory", help="With --dry-run: the memory to fit in, e.g. "
                                         "80GB (default: the device's)."),
    timed: bool = typer.Option(False, "--time", help="With --dry-run: also run a few training steps and an "
                               "evaluation batch here and estimate how long the run takes on this machine."),
    nproc: int = typer.Option(1, "--nproc", min=1, max=65536, help="Train on N local processes (torchrun's agent, "
                              "started here; one line per failure). With --dry-run: the figures per rank "
                              "(train.parallelism: fsdp shards weights and factors across them)."),
) -> None:
    """Joint M-member fine-tuning from a YAML recipe (SVE and its baselines)."""
    from sve_cli.recipe import find_recipe, load_recipe
    from sve_cli.train import interrupted_message, train as run_train

    if timed and not dry_run:
        raise SveError("--time estimates a run's duration within --dry-run: sve train RECIPE --dry-run --time")
    recipe = find_recipe(recipe)  # a local file, or one that ships with sve (`sve recipes`)
    loaded = load_recipe(recipe, overrides)
    if nproc != 1 and not dry_run:
        from sve_cli.launcher import check_ranks, launch

        check_ranks(nproc, loaded.train.device)
    if loaded.train.batch_size % nproc:
        raise SveError(f"train.batch_size {loaded.train.batch_size} is not divisible by --nproc {nproc}: each "
                       "process takes an equal share of every batch (choose a batch size that is)")
    if nproc != 1 and not dry_run:
        failures = launch(nproc, _without_option(sys.argv[1:], "--nproc"))
        for line in failures or ():
            console.print(f"[red]error:[/red] {one_line(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(0 if failures is None else 2)
    if dry_run:
        print_memory_plan(loaded, device.value, memory, nproc)
        if timed:
            print_time_estimate(loaded, nproc)
        return
    out = out or Path("runs") / recipe.stem
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and not resume:
        from sve_cli.export import recipe_export_notes

        for note in recipe_export_notes(loaded):  # what the export will be able to write: now, not after training
            out_console.print(note, soft_wrap=True, highlight=False)
    with progress_bar(BarColumn(), TextColumn("{task.completed}/{task.total}"), status_column(),
                   disable=not rank0) as progress:
        task = progress.add_task(f"{loaded.ensemble.method} M={loaded.ensemble.members}", total=None,
                                 status=f"loading {loaded.model.path} and {loaded.task.dataset_name}…")

        log_line = display.StepLog(enabled=rank0 and not out_console.is_terminal)  # `> train.log` gets plain lines

        def on_step(info: dict) -> None:
            progress.update(task, completed=info["step"], total=info["total"],
                            status=f"loss {info['loss']:.3f} acc {info['accuracy']:.2f} "
                                   f"{info['tokens_per_second']:.0f} tok/s epoch {info['epoch']:.2f}")
            if (line := log_line(info)) is not None:
                out_console.print(line, highlight=False, soft_wrap=True)

        def on_eval(line: dict) -> None:
            if rank0:
                progress.console.print(f"step {line['step']:>5} {line['split']}: " + " ".join(
                    f"{METRIC[key].label} {METRIC[key].format(line[key])}" for key in EVAL_METRICS
                    if key in line))

        try:
            state = run_train(loaded, out, resume=resume, overwrite=overwrite, on_step=on_step, on_eval=on_eval,
                              on_note=lambda text: out_console.print(text, soft_wrap=True, highlight=False))
        except KeyboardInterrupt:  # typer would swallow the message: say it here, exit as an interrupt does
            progress.stop()
            console.print(f"[red]{one_line(interrupted_message(recipe, out, overrides))}[/red]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    if rank0:
        out_console.print(display.run_summary(out, loaded, state))


@app.command(epilog="Example:  sve recipes quickstart --copy my_recipe.yaml")
def recipes(
    name: Optional[str] = typer.Argument(None, help="A shipped recipe to print (or copy with --copy)."),
    copy: Optional[Path] = typer.Option(None, "--copy", help="Write the recipe to this file, to edit it."),
) -> None:
    """List the recipes that ship with sve; print one, or copy it out to edit."""
    from sve_cli.errors import RecipeError
    from sve_cli.recipe import find_recipe, shipped_recipes

    if name is None:
        if copy is not None:
            raise SveError("--copy needs a recipe name: sve recipes NAME --copy FILE")
        for stem, (_, summary) in shipped_recipes().items():
            out_console.print(f"[bold]{stem:<20}[/bold] {summary}", highlight=False, soft_wrap=True)
        out_console.print("run one with `sve train recipes/NAME.yaml` (or `sve train NAME`); copy it out with "
                          "`sve recipes NAME --copy FILE`", highlight=False)
        return
    shipped = shipped_recipes()
    stem = Path(name).name.removesuffix(".yaml")
    if stem not in shipped:
        raise RecipeError(f"no shipped recipe named '{name}' (shipped: {', '.join(shipped)})")
    text = find_recipe(stem).read_text(encoding="utf-8")
    if copy is None:
        typer.echo(text, nl=False)
        return
    from sve_cli.writing import create_new

    create_new(copy, text, "--copy")
    out_console.print(f"wrote {copy}: edit it, then `sve train {copy}`", highlight=False)


@app.command(epilog="Example:  sve init --data reviews.csv --out reviews.yaml")
def init(
    data: str = typer.Option(..., "--data", help="Your data: a .csv/.jsonl/.parquet file (sve cuts it 80/10/10), or "
                             "a folder of split files (train.csv, validation.csv, test.csv)."),
    model: Optional[str] = typer.Option(None, "--model", help="The checkpoint to fine-tune (local path, builtin:… or "
                                        "hub id); default builtin:minilm, or builtin:smollm2 for prompt → answer data."),
    out: Path = typer.Option(Path("recipe.yaml"), "--out", help="The recipe to write (never replaced)."),
) -> None:
    """Propose a commented recipe for your own data: text and label columns (or prompt and answer columns, for
    generation), splits, max_length."""
    from sve_cli.recipe import load_recipe
    from sve_cli.scaffold import propose, render
    from sve_cli.writing import create_new

    if out.exists() or out.is_symlink():
        raise SveError(f"--out {out} already exists; sve never replaces it: choose another name")
    with console.status(f"reading {data}…"):
        proposal = propose(data, model)
    # validated as `sve train` will read it, before it is linked into place
    create_new(out, render(proposal, data, str(out)), "--out", check=load_recipe)
    columns = (f"generation with {proposal.model}: prompt '{proposal.text_field}', answer '{proposal.label_field}' "
               f"(at most {proposal.target_length} tokens)" if proposal.task == "generation" else
               f"text '{proposal.text_field}', label '{proposal.label_field}' ({len(proposal.classes)} classes)")
    out_console.print(f"wrote {out}: {columns}, max_length {proposal.max_length}; check it, then "
                      f"`sve train {out} --dry-run`", highlight=False, soft_wrap=True)
    if proposal.incomplete:
        out_console.print(f"note: {proposal.incomplete} row(s) of {data} have no '{proposal.text_field}' or no "
                          f"'{proposal.label_field}': sve train refuses them, so remove them first", highlight=False,
                          soft_wrap=True)


@app.command(epilog="Example:  sve evaluate runs/quickstart --ood bbc_news --save-predictions")
def evaluate(
    runs: list[Path] = typer.Argument(..., help="One or more run directories (several give a side-by-side table)."),
    data: Optional[str] = typer.Option(None, "--data", help="In-distribution set (default: the recipe's test split): "
                                       "a local jsonl/csv/parquet file, image folder, builtin:… or hub name."),
    ood: list[str] = typer.Option([], "--ood", help="OOD set: tweets, bbc_news, digits, mnist, svhn, cifar10, … or a path "
                                  "(repeatable)."),
    bins: Optional[int] = typer.Option(None, "--bins", min=1, max=10_000, help="Equal-width bins for ECE and the "
                                       "reliability diagram (default: the recipe's eval.bins)."),
    combine: Optional[Combine] = typer.Option(None, "--combine", help="Combine members by the mean of their "
                                              "probabilities or of their logits (default: the recipe's eval.combine)."),
    temperature: bool = typer.Option(False, "--temperature", help="Fit the temperature on the validation split "
                                     "now (by default the one sve train fitted is used; for runs trained with "
                                     "eval.calibration: none or before calibration existed)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Report directory (default: RUN/report)."),
    save_predictions: bool = typer.Option(False, "--save-predictions", help="Write predictions.safetensors."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="Cap each set's size."),
    bank: Optional[Path] = typer.Option(None, "--bank", help="Evaluate this Σ bank (e.g. an exported one) "
                                        "instead of the run's own."),
    cache_budget: Optional[str] = typer.Option(None, "--cache-budget", help="Memory the members' cached weights may "
                                               "use (auto, 0 or a size such as 4GB; default: the recipe's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report directory."),
    fit_thresholds: bool = typer.Option(False, "--fit-thresholds", help="Generation runs: also answer the "
                                        "validation split and fit the abstention thresholds `sve generate "
                                        "--abstain-coverage` uses (about doubles the time)."),
) -> None:
    """Calibration (Acc, NLL, Brier, ECE) and OOD-detection report of trained runs; for generation runs, the
    answers' quality and how well each uncertainty score flags a bad one (PRR, AUROC)."""
    from sve_cli.evaluate import evaluate_run
    from sve_cli.outputs import REPORT, check_output
    from sve_cli.report import fitted_payloads, write_report_once
    from sve_cli.rundir import write_fitted

    def report_dir(run: Path) -> Path:
        return (report / run.name if len(runs) > 1 else report) if report else run / "report"

    generation = _generation_runs(runs)
    given = [name for name, value in (("--data", data), ("--ood", ood), ("--bins", bins), ("--combine", combine),
                                      ("--temperature", temperature), ("--save-predictions", save_predictions),
                                      ("--bank", bank)) if value]
    if generation and given:
        raise SveError(f"{given[0]} does not apply to generation runs: they are evaluated on their test split")
    if fit_thresholds and not generation:
        raise SveError("--fit-thresholds is for generation runs: sve evaluate always fits a classifier's thresholds")
    paths = [item for item in (data, *ood) if item and Path(item).exists()]
    for run in runs:  # refuse before minutes of evaluation, not after
        check_output(report_dir(run), REPORT, overwrite, [run, bank, *paths], option="--report")
    if generation:
        _evaluate_generation(runs, report_dir, max_examples, overwrite, fit_thresholds)
        return
    how = combine.value if combine else None
    reports = []
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, every rank predicts and rank 0 writes
    for run in runs:
        with progress_bar(BarColumn(), TextColumn("{task.completed}/{task.total}"), disable=not rank0) as progress:
            tasks: dict[str, int] = {}

            def on_batch(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = progress.add_task(f"{run.name}: {name}", total=total)
                progress.update(tasks[name], completed=done)

            evaluation = evaluate_run(run, data, ood, bins, how, temperature, max_examples, on_batch, bank, cache_budget)
        if not rank0:
            continue
        directory = report_dir(run)
        reports.append(write_report_once(evaluation, directory, save_predictions, overwrite, [run, bank, *paths]))
        console.print(f"report written to {directory}")
        if bank is None:  # thresholds belong to the run's own bank
            written = " and ".join(str(path) for path in write_fitted(run, *fitted_payloads(evaluation)))
            console.print(f"abstention and conformal thresholds (fitted on validation) written to {written}")

    if rank0:
        out_console.print(display.evaluation(runs, reports))


def _generation_runs(runs: list[Path]) -> bool:
    """Whether these runs generate text (all of them), or classify (all of them); mixed runs are refused."""
    from sve_cli.rundir import open_run

    kinds = {open_run(run)[0].task.type == "generation" for run in runs}
    if len(kinds) > 1:
        raise SveError("generation runs and classification runs cannot share one table: evaluate them apart")
    return kinds.pop()


def _evaluate_generation(runs: list[Path], report_dir, max_examples: Optional[int], overwrite: bool,
                         fit_thresholds: bool) -> None:
    """Answer each run's test split (and, fitting thresholds, its validation split) and judge its
    uncertainty scores (sve_cli/answers.py)."""
    from sve_cli.answers import answers_table, evaluate_generation, thresholds_payload, write_generation_report
    from sve_cli.outputs import REPORT, check_output, output_lock
    from sve_cli.rundir import THRESHOLDS
    from sve_cli.writing import write_json

    reports = []
    for run in runs:
        with progress_bar(BarColumn(), TextColumn("{task.completed}/{task.total}")) as progress:
            tasks: dict[str, int] = {}

            def on_rows(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = progress.add_task(f"{run.name}: answering {split}", total=total)
                progress.update(tasks[split], completed=done)

            report = evaluate_generation(run, max_examples, thresholds=fit_thresholds, on_rows=on_rows)
        directory = report_dir(run)
        with output_lock(directory):
            check_output(directory, REPORT, overwrite, [run], option="--report")
            write_generation_report(report, directory)
        console.print(f"report written to {directory}")
        if fit_thresholds:
            write_json(run / THRESHOLDS, thresholds_payload(report))
            console.print(f"abstention thresholds (fitted on {report['validation_examples']} validation answers) "
                          f"written to {run / THRESHOLDS}")
        reports.append(report)
    out_console.print(answers_table(runs, reports))


@app.command(epilog="Example:  sve export runs/quickstart --format safetensors --member 0 --out exported/")
def export(
    run: Path = typer.Argument(..., help="A trained run directory."),
    format: ExportFormat = typer.Option(..., "--format", help="safetensors (a merged member as a plain checkpoint) "
                                        "or sigma-bank (the compact bank)."),
    member: str = typer.Option("0", "--member", help="Member index, or 'mean' (Σ and heads averaged: a summary, "
                               "not a trained member)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (safetensors) or file (sigma-bank) "
                                       "(default: RUN/export-member<m> or RUN/sigma_bank-export.safetensors)."),
    dtype: Optional[ExportDtype] = typer.Option(None, "--dtype", help="dtype of the weights written "
                                                "(default: the base checkpoint's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export a merged member as a standard checkpoint, or the compact Σ bank."""
    from sve_cli.export import export_bank, export_merged

    if format == ExportFormat.sigma_bank:
        result = export_bank(run, out or run / "sigma_bank-export.safetensors", overwrite)
        out_console.print(f"wrote {result['out']}: {display.human(result['bytes'])} for {result['members']} members, "
                          f"{100 * result['share']:.2f}% of the base checkpoint ({display.human(result['base_bytes'])})")
        return
    if member != "mean" and not member.isdigit():
        raise SveError(f"--member must be a member index or 'mean', not '{member}'")
    chosen = member if member == "mean" else int(member)
    with console.status("merging and writing tensors…"):
        result = export_merged(run, out or run / f"export-member{member}", chosen, dtype and dtype.value,
                               max_shard_size, overwrite)
    kind = "SentenceTransformer" if result["library"] == "sentence-transformers" else result["architecture"]
    out_console.print(f"wrote {result['out']}: {result['architecture']}, {display.human(result['bytes'])} in "
                      f"{result['shards']} shard(s); load it with {result['library']}' {kind}")


class Decoding(str, Enum):
    greedy = "greedy"
    sample = "sample"


@app.command(epilog="Example:  sve generate runs/smollm2_bbc_mc --data prompts.jsonl --max-new-tokens 24 --member-answers")
def generate(
    source: Path = typer.Argument(..., help="A run directory of a decoder LM, or a Σ bank file."),
    data: str = typer.Option(..., "--data", help="Prompts: a jsonl/csv/parquet file with a prompt column."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="The column that holds the prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .jsonl (default: generations.jsonl beside the run)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, max=4096, help="Tokens to generate at most."),
    decoding: Decoding = typer.Option(Decoding.greedy, "--decoding", help="The next token: the members' mean "
                                      "distribution's most likely one, or a sample from it."),
    seed: int = typer.Option(0, "--seed", help="With --decoding sample: the sampling seed."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts decoded together (× members rows)."),
    member_answers: bool = typer.Option(False, "--member-answers", help="Also decode each member's own greedy "
                                        "answer and say how many agree with the ensemble's."),
    tokens: bool = typer.Option(False, "--tokens", help="Add each generated token with its scores."),
    bank: Optional[Path] = typer.Option(None, "--bank", help="With a run directory: use this Σ bank."),
    abstain_coverage: Optional[float] = typer.Option(None, "--abstain-coverage", min=0.5, max=0.995, help="Mark "
                                                     "the least sure answers `abstain` so that this share is kept, by "
                                                     "the thresholds `sve evaluate --fit-thresholds` fitted."),
    abstain_score: Optional[str] = typer.Option(None, "--abstain-score", help="The score --abstain-coverage reads: "
                                                "nll, nll_per_token, entropy_mean, entropy_max, expected_entropy, "
                                                "mutual_information (default: mutual_information, or nll for one member)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Generate text with all members at once (one batched forward per token, a KV cache per member) and
    score how sure the ensemble is: log-likelihood, token entropy, mutual information."""
    from sve_cli.answers import SCORES, abstention_threshold, marked
    from sve_cli.generation import generation_rows
    from sve_cli.predict import check_predictions_output, open_predictor, write_predictions

    if decoding == Decoding.greedy and seed != 0:
        raise SveError("--seed chooses the samples of --decoding sample; greedy decoding has none")
    if abstain_score is not None and abstain_score not in SCORES:
        raise SveError(f"--abstain-score {abstain_score} is none of {', '.join(SCORES)}")
    if abstain_score is not None and abstain_coverage is None:
        raise SveError("--abstain-score chooses what --abstain-coverage reads: give --abstain-coverage too")
    out = out or (source if source.is_dir() else source.parent) / "generations.jsonl"
    if out.suffix.lower() != ".jsonl":
        raise SveError(f"--out {out}: generations are written as .jsonl")
    inputs = [source, bank, data if Path(data).exists() else None]
    check_predictions_output(out, overwrite, inputs)
    with console.status(f"loading {source}…"):
        predictor = open_predictor(source, bank)
    abstention = (abstention_threshold(source, predictor.bank, predictor.model.members, abstain_coverage,
                                       abstain_score)
                  if abstain_coverage is not None else None)
    with progress_bar(TextColumn("{task.completed} prompts"), eta=False) as progress:
        task = progress.add_task("generating", total=None)
        rows = generation_rows(predictor, data, prompt_field, max_new_tokens, batch_size,
                               sample=decoding == Decoding.sample, seed=seed, member_answers=member_answers,
                               tokens=tokens, on_rows=lambda count: progress.advance(task, count))
        if abstention is not None:
            rows = marked(rows, *abstention)
        summary = write_predictions(rows, out, overwrite, inputs)
    note = f"; abstain by {abstention[0]} ≤ {abstention[1]:.4g} kept at {abstain_coverage:g} coverage" if abstention else ""
    out_console.print(f"wrote {out}: {summary['rows']} generations from {predictor.model.members} member(s){note}",
                      highlight=False, soft_wrap=True)


@app.command(epilog="Example:  sve predict runs/quickstart --data new_tweets.jsonl --abstain-coverage 0.9")
def predict(
    source: Path = typer.Argument(..., help="A run directory, or a Σ bank file (it carries its recipe)."),
    data: str = typer.Option(..., "--data", help="Inputs: a jsonl/csv/parquet file, image folder, builtin:… or hub "
                             "name; labels are optional."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file: .jsonl (default), .csv or .parquet "
                                       "(default: predictions.jsonl beside the run or bank)."),
    member: Optional[int] = typer.Option(None, "--member", min=0, help="Predict with this member alone."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Inputs per forward pass."),
    score: Score = typer.Option(Score.entropy, "--score", help="Uncertainty score that decides abstention."),
    abstain_coverage: Optional[float] = typer.Option(None, "--abstain-coverage", min=0.5, max=0.995,
                                                     help="Answer this share of inputs, by the threshold fitted "
                                                     "on validation (sve evaluate)."),
    abstain_risk: Optional[float] = typer.Option(None, "--abstain-risk", min=0.0, max=1.0,
                                                 help="Answer as many inputs as keep the validation error rate "
                                                 "at most this."),
    abstain_threshold: Optional[float] = typer.Option(None, "--abstain-threshold",
                                                      help="Abstain when the score exceeds this value."),
    conformal: Optional[float] = typer.Option(None, "--conformal", help="Give each row a prediction set that holds "
                                              "the true label with this probability (0.8, 0.9 or 0.95; fitted by sve "
                                              "evaluate)."),
    conformal_score: Optional[ConformalScore] = typer.Option(None, "--conformal-score", show_default=False,
                                                             help="With --conformal: the conformal score the sets "
                                                             "are built from (default: lac)."),
    conformal_mode: Optional[ConformalMode] = typer.Option(None, "--conformal-mode", show_default=False,
                                                           help="With --conformal: marginal (coverage on average "
                                                           "over inputs) or class (within every class) (default: "
                                                           "marginal)."),
    bank: Optional[Path] = typer.Option(None, "--bank", help="With a run directory: use this Σ bank."),
    raw: bool = typer.Option(False, "--raw", help="Write the raw ensemble's probabilities instead of the calibrated "
                             "ones (the temperature sve train fitted on validation)."),
    cache_budget: Optional[str] = typer.Option(None, "--cache-budget", help="Memory the members' cached weights may "
                                               "use (auto, 0 or a size such as 4GB; default: the recipe's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Label new inputs with probabilities and uncertainty; abstain where the ensemble is unsure."""
    from sve_cli.predict import (abstain_threshold as choose_threshold, answered_accuracy, check_predictions_output,
                                 check_risk_level, conformal_threshold, coverage_of, open_predictor, predict_rows,
                                 write_predictions)

    if sum(option is not None for option in (abstain_coverage, abstain_risk, abstain_threshold)) > 1:
        raise SveError("give at most one of --abstain-coverage, --abstain-risk and --abstain-threshold")
    check_risk_level(abstain_risk)
    for option, value in (("--conformal-score", conformal_score), ("--conformal-mode", conformal_mode)):
        if value is not None and conformal is None:
            raise SveError(f"{option} chooses how --conformal builds its sets: give --conformal LEVEL too "
                           "(e.g. --conformal 0.9)")
    if abstain_threshold is not None and not math.isfinite(abstain_threshold):
        raise SveError(f"--abstain-threshold must be a finite number, not {abstain_threshold}")
    out = out or (source if source.is_dir() else source.parent) / "predictions.jsonl"
    inputs = [source, bank, data if Path(data).exists() else None]
    check_predictions_output(out, overwrite, inputs)  # before minutes of loading, not after
    with console.status(f"loading {source}…"):
        predictor = open_predictor(source, bank)
    if predictor.recipe.task.type == "generation":
        raise SveError(f"{source} generates text, it does not classify: `sve generate {source} --data {data}`")
    inputs.append(predictor.recipe.model.path if Path(predictor.recipe.model.path).exists() else None)
    threshold, where = choose_threshold(predictor, score.value, abstain_coverage, abstain_risk, abstain_threshold, raw)
    sets = None
    if conformal is not None:
        chosen = (conformal_score or ConformalScore.lac).value
        value, said = conformal_threshold(predictor, conformal, chosen, raw, by_class=conformal_mode == ConformalMode.class_)
        sets, where = (chosen, value), f"{where}; {said}"
    rank0 = predictor.parallel.writer  # under torchrun, every rank predicts a share and rank 0 writes
    with progress_bar(TextColumn("{task.completed} rows"), eta=False, disable=not rank0) as progress:
        task = progress.add_task("predicting", total=None)
        rows = predict_rows(predictor, data, member, batch_size, score.value, threshold,
                            on_rows=lambda count: progress.advance(task, count), sets=sets, cache_budget=cache_budget,
                            raw=raw)
        if not rank0:
            for _ in rows:  # the other ranks take part in every chunk's collectives
                pass
            return
        summary = write_predictions(rows, out, overwrite, inputs)
    line = f"wrote {out}: {summary['rows']} rows"
    if threshold is not None:
        line += f", answered {100 * coverage_of(summary):.1f}% (abstained on {summary['abstained']})"
    if (accuracy := answered_accuracy(summary)) is not None:
        line += f", accuracy on the answered labelled rows {100 * accuracy:.2f}%"
    out_console.print(f"{line}; {predictor.probability_note(member, raw)}; {where}", soft_wrap=True, highlight=False)


USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENOTDIR,
               errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV}


def _without_option(arguments: list[str], option: str) -> list[str]:
    """`arguments` less `option VALUE` / `option=VALUE` (what each rank of a launch is given)."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return kept


def main() -> None:
    """Console entry point: usage mistakes get typer's usage line, user errors one line; both exit 2.
    Anything else is a bug of ours and keeps its traceback."""
    from pydantic import ValidationError

    from sve_cli.recipe import validation_line

    show_library_notices()
    try:
        code = app(standalone_mode=False, prog_name="sve")
    except click.ClickException as error:  # an unknown command or option, a missing or bad value
        if "Did you mean" in error.message and getattr(error, "possibilities", None):
            error.possibilities = None  # typer's message already suggests; click 8.4 would add its own again
        error.show()
        sys.exit(error.exit_code)
    except SveError as error:
        print_error(one_line(error))
        sys.exit(2)
    except ValidationError as error:  # e.g. the recipe a Σ bank carries
        print_error(one_line(validation_line(error)))
        sys.exit(2)
    except OSError as error:
        if error.errno not in USER_ERRNOS:
            raise
        where = f" {error.filename}" if error.filename else ""
        print_error(one_line(f"cannot read or write{where}: {error.strerror or error}"))
        sys.exit(2)
    except RuntimeError as error:
        if not is_peer_lost(error):
            raise
        print_error(f"{PEER_LOST} ({one_line(str(error).splitlines()[0])[:160]}); its own message says why",
                     peer_lost=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as error:
        console.print(f"[red]{one_line(error) or 'interrupted'}[/red]", highlight=False, soft_wrap=True)
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(code) returns its code when not standalone
        sys.exit(code)
