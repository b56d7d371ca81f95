"""`sve evaluate` on a generation run: how good each generated answer is, and how well each uncertainty
score flags the bad ones.

The ensemble answers every test prompt (greedy from the members' mean distribution, `sve_cli.generation`);
each answer is scored against its reference by normalised exact match (SQuAD's normalisation) and ROUGE-L
(Google's `rouge-score` package, F-measure). Each uncertainty score (higher = less sure) is then judged by

- PRR, the prediction–rejection ratio as LM-Polygraph defines it: the area under the curve of mean quality
  (ROUGE-L) of the answers kept as the most uncertain are rejected, between the random order's (0) and
  the oracle's (1);
- its AUROC for wrong answers, an answer being wrong when its ROUGE-L is below 0.3 (Kuhn et al., 2023).

Sequence scores: negative log-likelihood (total and per token: what a single model has), the mean and
max token entropy of the mixture, and (M > 1) the mean expected entropy and mutual information.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from sve_cli import __version__
from sve_cli.errors import SveError
from sve_cli.metrics import auroc

WRONG_BELOW = 0.3  # ROUGE-L under which an answer counts as wrong (Kuhn et al., 2023)
# report name -> (Decoded.summary key, sign): every score is oriented so that higher = less sure
SCORES = {
    "nll": ("log_likelihood", -1.0),
    "nll_per_token": ("log_likelihood_per_token", -1.0),
    "entropy_mean": ("total_entropy_mean", 1.0),
    "entropy_max": ("total_entropy_max", 1.0),
    "expected_entropy": ("expected_entropy_mean", 1.0),
    "mutual_information": ("mutual_information_mean", 1.0),
}
ENSEMBLE_ONLY = ("expected_entropy", "mutual_information")  # a single model has neither (MI = 0)
REJECTION_PLOT = "rejection.png"


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(character for character in text.lower() if character not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each answer against its reference (`rouge-score`, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(reference, answer)["rougeL"].fmeasure for answer, reference in zip(answers, references)]


def rejection_curve(uncertainty: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Mean quality of the answers kept `[N]`: entry i keeps the N - i least uncertain (ties: input order)."""
    order = torch.sort(uncertainty.double(), stable=True).indices  # the surest first
    kept = quality.double()[order].cumsum(0) / torch.arange(1, len(order) + 1, dtype=torch.float64)  # [N]
    return kept.flip(0)  # reject 0, 1, … of the most uncertain


def prr(uncertainty: torch.Tensor, quality: torch.Tensor) -> float:
    """(area under the score's rejection curve − random's) / (oracle's − random's); NaN when every answer is
    equally good (no order can do better than another)."""
    area = float(rejection_curve(uncertainty, quality).mean())
    oracle = float(rejection_curve(-quality.double(), quality).mean())
    random = float(quality.double().mean())  # the expected curve of a random order is flat at the mean
    return (area - random) / (oracle - random) if oracle - random > 1e-12 else float("nan")


def score_values(rows: list[dict], members: int) -> dict[str, torch.Tensor]:
    """Each uncertainty score over the examples `[N]`, higher = less sure."""
    names = [name for name in SCORES if members > 1 or name not in ENSEMBLE_ONLY]
    return {name: torch.tensor([SCORES[name][1] * row[SCORES[name][0]] for row in rows], dtype=torch.float64)
            for name in names}


def judge(rows: list[dict], members: int) -> dict:
    """Answer quality and, per score, PRR and AUROC for wrong answers, from rows holding `rouge_l` and
    `exact_match` and the sequence scores."""
    quality = torch.tensor([row["rouge_l"] for row in rows], dtype=torch.float64)
    wrong = quality < WRONG_BELOW
    scores = {}
    for name, values in score_values(rows, members).items():  # None where undefined (every answer alike)
        value = prr(values, quality)
        scores[name] = {"prr": None if value != value else value,
                        "auroc_wrong": auroc(values[~wrong], values[wrong]) if 0 < int(wrong.sum()) < len(rows)
                        else None}
    return {"rouge_l": float(quality.mean()), "exact_match": sum(row["exact_match"] for row in rows) / len(rows),
            "wrong_share": float(wrong.double().mean()), "oracle_prr": 1.0, "scores": scores}


def _answers(decoder, eos: set[int], pad: int, keep: int, tokenizer, examples, count: int, new_tokens: int,
             batch_size: int, on_rows: Callable[[int, int], None] | None) -> list[dict]:
    """The first `count` examples answered (greedy from the members' mean distribution) and judged."""
    from sve_cli.generation import decode

    rows = []
    for start in range(0, count, batch_size):
        prompts = examples.texts[start:min(start + batch_size, count)]
        encoded = [tokenizer(text)["input_ids"][-keep:] for text in prompts]
        for offset, decoded in enumerate(decode(decoder, encoded, new_tokens, eos, pad)):
            answer = tokenizer.decode(decoded[0].tokens, skip_special_tokens=True).strip()
            reference = examples.targets[start + offset].strip()
            rows.append({"id": start + offset, "answer": answer, "reference": reference,
                         "exact_match": exact_match(answer, reference), **decoded[0].summary()})
        on_rows and on_rows(len(rows), count)
    for row, value in zip(rows, rouge_l([row["answer"] for row in rows], [row["reference"] for row in rows])):
        row["rouge_l"] = value
    return rows


def answer_quality(model, pipeline, examples, count: int | None = None, batch_size: int = 8) -> float:
    """`eval.metric: rouge_l`: the mean ROUGE-L of `model`'s greedy answers to the first `count` (all) prompts of
    `examples` (a split of `pipeline`'s task), up to the recipe's `max_target_length` new tokens; the model's
    mode is kept."""
    from sve_cli.generation import decoder_for

    new_tokens = pipeline.recipe.task.max_target_length
    was_training = model.training
    model.eval()
    try:
        rows = _answers(*decoder_for(model, pipeline, new_tokens), pipeline.tokenizer, examples,
                        min(len(examples), count or len(examples)), new_tokens, batch_size, None)
    finally:
        model.train(was_training)
    return sum(row["rouge_l"] for row in rows) / max(1, len(rows))


def answer_splits(run: Path, max_examples: int | None = None, max_new_tokens: int | None = None,
                  batch_size: int = 8, validation: bool = False,
                  on_rows: Callable[[str, int, int], None] | None = None) -> tuple[dict, list[dict], list[dict]]:
    """The run's test split (and, with `validation`, its validation split) answered by its ensemble: (what
    was evaluated, one row per test example, one per validation example)."""
    from sve_cli.checkpoint import file_fingerprint
    from sve_cli.data import load_splits, split_origins
    from sve_cli.generation import decoder_for
    from sve_cli.pipeline import load_ensemble
    from sve_cli.rundir import RECIPE, open_run

    recipe, bank = open_run(run)
    if recipe.task.type != "generation":
        raise SveError(f"{run} is not a generation run")
    pipeline, model, metadata = load_ensemble(recipe, bank)
    splits, _ = load_splits(recipe.task, str(run / RECIPE))
    new_tokens = max_new_tokens or recipe.task.max_target_length
    decoding = decoder_for(model, pipeline, new_tokens)
    answered = {}
    for name in [recipe.task.test_split] + ([recipe.task.validation_split] if validation else []):
        examples = splits[name]
        count = min(len(examples), max_examples or len(examples))
        answered[name] = _answers(*decoding, pipeline.tokenizer, examples, count, new_tokens, batch_size,
                                  on_rows and (lambda done, total, name=name: on_rows(name, done, total)))
    test = recipe.task.test_split
    about = {"run": str(run), "base_model": metadata["base_model"], "method": metadata.get("method"),
             "members": metadata["members"], "best_step": metadata.get("step"), "bank": file_fingerprint(bank),
             "data": f"{split_origins(recipe.task)[test]} [{test}]", "examples": len(answered[test]),
             "max_new_tokens": new_tokens, "decoding": "greedy, from the members' mean distribution"}
    return about, answered[test], answered.get(recipe.task.validation_split, [])


def fit_answer_thresholds(rows: list[dict], members: int) -> dict[str, dict]:
    """Abstention thresholds of every score on answered validation rows: an answer is right when its ROUGE-L
    is at least `WRONG_BELOW` (`selective.fit_score_thresholds`)."""
    from sve_cli.selective import fit_score_thresholds

    right = torch.tensor([row["rouge_l"] >= WRONG_BELOW for row in rows])
    return fit_score_thresholds(score_values(rows, members), right)


def evaluate_generation(run: Path, max_examples: int | None = None, max_new_tokens: int | None = None,
                        batch_size: int = 8, thresholds: bool = False,
                        on_rows: Callable[[str, int, int], None] | None = None) -> dict:
    """The report of a generation run: what was evaluated, the answers' quality, each score's PRR and AUROC,
    and (`thresholds`) abstention thresholds fitted on the validation split's answers."""
    about, rows, validation_rows = answer_splits(run, max_examples, max_new_tokens, batch_size, thresholds, on_rows)
    fitted = {"thresholds": fit_answer_thresholds(validation_rows, about["members"]),
              "validation_examples": len(validation_rows), "validation_answers": validation_rows} if thresholds else {}
    return {"tool": f"sve {__version__}", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **about, **fitted, "conventions": {
                "quality": "ROUGE-L F-measure (rouge-score, no stemming); exact match after SQuAD's normalisation",
                "prr": "prediction-rejection ratio (LM-Polygraph): area under the mean-quality rejection curve, "
                       "0 = random order, 1 = oracle",
                "auroc_wrong": f"AUROC of the score for answers with ROUGE-L < {WRONG_BELOW} (wrong) against the rest",
                "scores": "higher = less sure; nll = −log p̄(answer), entropies and MI are means over the answer's "
                          "tokens of the members' mean distribution (Malinin & Gales, 2021)"},
            **judge(rows, about["members"]), "answers": rows}


def thresholds_payload(report: dict) -> dict:
    """`RUN/thresholds.json` of a generation run: per score, the threshold of each coverage level and target
    risk, fitted on the validation split's answers, tied to the bank they were fitted for."""
    return {"tool": report["tool"], "created": report["created"], "bank": report["bank"], "fitted_on": "validation",
            "examples": report["validation_examples"], "task": "generation",
            "rule": "accept an answer when its score is at most the threshold (higher score = less sure); "
                    f"an answer is right when its ROUGE-L is at least {WRONG_BELOW}",
            "scores": report["thresholds"]}


def abstention_threshold(source: Path, bank: Path, members: int, coverage: float,
                         score: str | None) -> tuple[str, float]:
    """(score, threshold) for `sve generate --abstain-coverage`: the threshold `sve evaluate --fit-thresholds`
    fitted on the run's validation answers for `bank` (score: MI for an ensemble, else the sequence NLL)."""
    from sve_cli.rundir import THRESHOLDS, read_fitted

    score = score or ("mutual_information" if members > 1 else "nll")
    fitted = read_fitted(source / THRESHOLDS, bank) if source.is_dir() else None
    if fitted is None or fitted.get("task") != "generation":
        raise SveError(f"--abstain-coverage needs thresholds fitted on this run's answers: "
                       f"`sve evaluate {source} --fit-thresholds`")
    levels = fitted["scores"].get(score, {}).get("coverage", {})
    if f"{coverage:g}" not in levels:
        raise SveError(f"no {score} threshold for coverage {coverage:g} (fitted: {', '.join(levels) or 'none'}; "
                       f"scores: {', '.join(fitted['scores'])})")
    return score, float(levels[f"{coverage:g}"])


def marked(chunks, score: str, threshold: float):
    """Each row of each chunk of `sve generate` rows with `abstain`: its score above the threshold (less sure
    than the kept share)."""
    key, sign = SCORES[score]
    for rows in chunks:
        yield [{**row, "abstain": sign * row[key] > threshold} for row in rows]


def rejection_png(path: Path, report: dict) -> None:
    """Mean ROUGE-L of the answers kept against the share rejected, per score, with the oracle's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sve_cli.report import save_figure

    rows = report["answers"]
    quality = torch.tensor([row["rouge_l"] for row in rows], dtype=torch.float64)
    rejected = torch.arange(len(rows), dtype=torch.float64) / len(rows)
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    for name, values in score_values(rows, report["members"]).items():
        value = report["scores"][name]["prr"]
        axis.plot(rejected.numpy(), rejection_curve(values, quality).numpy(),
                  label=f"{name} (PRR {'—' if value is None else f'{value:.3f}'})")
    axis.plot(rejected.numpy(), rejection_curve(-quality, quality).numpy(), color="black", linestyle=":", label="oracle")
    axis.axhline(float(quality.mean()), color="grey", linestyle="--", label="random")
    axis.set_xlabel("share of answers rejected (most uncertain first)")
    axis.set_ylabel("mean ROUGE-L of the answers kept")
    axis.set_title(f"{Path(report['run']).name}: rejection curves")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def write_generation_report(report: dict, directory: Path) -> None:
    """`report.json` (every number and answer) and the rejection plot, under the report marker rule."""
    from sve_cli.writing import write_json

    directory.mkdir(parents=True, exist_ok=True)
    files = sorted({"report.json", REJECTION_PLOT})
    write_json(directory / "report.json", {"tool": report["tool"], "complete": False, "files": files})
    rejection_png(directory / REJECTION_PLOT, report)
    write_json(directory / "report.json", {**report, "files": files})


def answers_table(runs: list[Path], reports: list[dict]):
    """`sve evaluate`'s table for generation runs: one column per run."""
    from rich.table import Table

    table = Table(title="generation: " + reports[0]["data"], title_justify="left")
    table.add_column("metric")
    for run, report in zip(runs, reports):
        table.add_column(f"{run.name}\n{report['method']} M={report['members']}", justify="right")
    table.add_row("ROUGE-L (%)", *[f"{100 * r['rouge_l']:.2f}" for r in reports])
    table.add_row("exact match (%)", *[f"{100 * r['exact_match']:.2f}" for r in reports])
    table.add_row(f"wrong (ROUGE-L < {WRONG_BELOW}) (%)", *[f"{100 * r['wrong_share']:.2f}" for r in reports])
    def cell(report: dict, name: str, key: str, scale: float, digits: int) -> str:
        value = report["scores"].get(name, {}).get(key)
        return "—" if value is None else f"{scale * value:.{digits}f}"

    for name in SCORES:
        table.add_row(f"PRR {name}", *[cell(r, name, "prr", 1, 3) for r in reports])
    for name in SCORES:
        table.add_row(f"AUROC wrong {name} (%)", *[cell(r, name, "auroc_wrong", 100, 2) for r in reports])
    return table
