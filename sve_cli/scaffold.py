"""`sve init --data FILE`: a commented recipe for a user's own data, proposed from the data itself.

A column named like an answer (`target`, `completion`, `response`, …) holding free text — more distinct
values than a classifier has classes — makes it a generation recipe (prompt → answer, a decoder LM,
`builtin:smollm2` unless `--model` says otherwise); anything else a text classification recipe.

Reads the file (or a folder / mapping of split files), proposes the text and label columns, the splits
X
length of the training texts (95th percentile, at most 256 on account of CPU cost), and writes a recipe in the quickstart's shape, with a
header that says how it was proposed, how to run it and about what it costs. The recipe is validated
before it is written, so `sve train FILE` reads what `sve init` wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sve_cli.errors import SveError

TEXT_NAMES = ("text", "sentence", "content", "review", "tweet", "body", "article", "document", "question", "comment")
LABEL_NAMES = ("label", "labels", "class", "category", "target", "sentiment", "topic", "y")
MAX_CLASSES = 100
MAX_LENGTH_CAP = 256  # longer inputs cost quadratically more on a CPU: raise it in the recipe on a GPU
ANSWER_NAMES = ("target", "completion", "response", "answer", "output", "summary", "headline", "title", "reference")
MAX_TARGET_CAP = 64  # tokens of an answer
DEFAULT_MODELS = {"text_classification": "builtin:minilm", "generation": "builtin:smollm2"}
# relative singular values on SmolLM2's headlines: the rate whose validation answers were best (docs/results.md §7)
GENERATION_LR = 1.0e-1
QUICKSTART_STEP_SECONDS = 1.7  # MiniLM, M = 4, 16 rows × 40 tokens per step, 2 CPU cores (recipes/quickstart.yaml)


@dataclass
class Proposal:
    model: str
    text_field: str  # generation: the prompts
    label_field: str  # generation: the answers
    classes: list[str]  # generation: none
    rows: dict[str, int]  # per split as read (one file: the 80/10/10 cut)
    splits: str  # in words
    validation_split: str  # a split name, or "train:10%"
    max_length: int
    cut_share: float  # of training texts longer than max_length
    incomplete: int = 0  # rows (all splits) without a text or a label: `sve train` refuses them
    task: str = "text_classification"
    target_length: int = 0  # generation: answer tokens kept (95th percentile, at most MAX_TARGET_CAP)
    first_target_block: int = 0  # generation: the upper third of the blocks are the targets


def _text_column(frame: pd.DataFrame, exclude: set[str]) -> str:
    strings = [c for c in frame.columns if c not in exclude and len(frame[c].dropna())
               and frame[c].dropna().map(lambda v: isinstance(v, str)).all()]
    named = [c for c in strings if c.lower() in TEXT_NAMES]
    if named:
        return named[0]
    if not strings:
        raise SveError(f"no column holds text (columns: {', '.join(map(str, frame.columns))}): sve init proposes "
                       "text classification recipes")
    return max(strings, key=lambda c: frame[c].dropna().str.len().mean())


def _answer_column(frame: pd.DataFrame) -> str | None:
    """A column of free text to generate: named like an answer, all strings, and more distinct values than a
    classifier's classes (over half the rows, or over MAX_CLASSES)."""
    for column in frame.columns:
        values = frame[column].dropna()
        if str(column).lower() in ANSWER_NAMES and len(values) and values.map(lambda v: isinstance(v, str)).all() \
                and values.nunique() > min(MAX_CLASSES, len(values) // 2):
            return column
    return None


def _percentile_tokens(tokenizer, texts: list[str], cap: int) -> tuple[int, float]:
    """The 95th percentile of the texts' token counts, rounded up to 8, within [16, cap]; and the share longer."""
    lengths = sorted(len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"])
    longest = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    kept = max(16, min(cap, 8 * math.ceil(longest / 8)))
    return kept, sum(length > kept for length in lengths) / len(lengths)


def _label_column(frame: pd.DataFrame) -> str:
    named = [c for c in frame.columns if str(c).lower() in LABEL_NAMES]
    if named:
        return named[0]
    few = [c for c in frame.columns if 2 <= frame[c].nunique() <= min(MAX_CLASSES, max(2, len(frame) // 2))]
    if not few:
        raise SveError(f"cannot tell which column holds the labels (columns: {', '.join(map(str, frame.columns))}): "
                       f"name it 'label', or set task.label_field in a copied recipe (sve recipes quickstart --copy FILE)")
    return min(few, key=lambda c: frame[c].nunique())


def propose(data: str, model: str | None) -> Proposal:
    """Read `data` and propose the task, model (`model`, or the task's default), columns, splits and lengths."""
    from sve_cli.architectures import check_generation
    from sve_cli.checkpoint import open_checkpoint
    from sve_cli.data import Table, load_source, seeded_splits
    from sve_cli.pipeline import load_tokenizer

    source = load_source(data)
    if isinstance(source, Table):
        if source.frame.columns.tolist() == ["image", "label"]:
            raise SveError(f"{data} is an image folder: start from `sve recipes digits_vit --copy FILE` instead")
        tables = seeded_splits(source, "train", "validation", "test")
        splits, validation = f"{data}, cut 80/10/10 by sve (seeded)", "validation"
    else:
        tables = dict(source)
        if "train" not in tables:
            raise SveError(f"the split files of {data} have no 'train' split (splits: {', '.join(sorted(tables))})")
        validation = "validation" if "validation" in tables else "train:10%"
        splits = ", ".join(sorted(tables)) + ("" if "validation" in tables else "; validation: 10% held out of train")
        if "test" not in tables:
            raise SveError(f"the split files of {data} have no 'test' split (splits: {', '.join(sorted(tables))}): "
                           "add a test file, or point --data at one file for sve's 80/10/10 cut")
    train = tables["train"].frame
    answer = _answer_column(train)
    task = "generation" if answer is not None else "text_classification"
    label = answer if answer is not None else _label_column(train)
    text = _text_column(train, {label})
    model = model or DEFAULT_MODELS[task]
    checkpoint = open_checkpoint(model)
    tokenizer = load_tokenizer(checkpoint.directory, model)
    classes, target_length, first_block = [], 0, 0
    if task == "generation":
        try:
            check_generation(checkpoint)
        except SveError as error:
            raise SveError(f"{data} holds prompt → answer pairs ('{label}' is free text: "
                           f"{train[label].nunique():,} distinct values), and {error}; pass a decoder, e.g. "
                           f"--model {DEFAULT_MODELS[task]}") from None
        target_length = _percentile_tokens(tokenizer, train[label].dropna().astype(str).head(2000).tolist(),
                                           MAX_TARGET_CAP)[0]
        blocks = checkpoint.config.get("num_hidden_layers") or checkpoint.config.get("n_layer") or 3
        first_block = blocks - max(1, blocks // 3)
    else:
        classes = sorted(map(str, train[label].dropna().unique()))
        if len(classes) < 2:
            raise SveError(f"column '{label}' of the training split holds one class ({classes[0] if classes else 'none'}): "
                           "a classifier needs at least two")
    max_length, cut = _percentile_tokens(tokenizer, train[text].dropna().astype(str).head(2000).tolist(),
                                         MAX_LENGTH_CAP)
    incomplete = sum(int((table.frame[text].isna() | table.frame[label].isna()).sum()) for table in tables.values()
                     if {text, label} <= set(table.frame.columns))
    return Proposal(model, text, label, classes, {name: len(table.frame) for name, table in tables.items()}, splits,
                    validation, max_length + target_length, cut, incomplete, task, target_length, first_block)


def render(proposal: Proposal, data: str, out: str) -> str:
    """The recipe's text: a comment header, then the quickstart's shape (generation: the headline recipe's)
    with the proposed values."""
    if proposal.task == "generation":
        return _render_generation(proposal, data, out)
    model = proposal.model
    train_rows = proposal.rows["train"] if proposal.validation_split == "validation" else int(0.9 * proposal.rows["train"])
    steps = 2 * max(1, train_rows // 16)
    minutes = steps * QUICKSTART_STEP_SECONDS * proposal.max_length / 40 / 60
    cost = (f"about {max(1, round(minutes))} minutes of training on 2 CPU cores ({steps} steps; scaled from the "
            "quickstart's measured step)" if model == "builtin:minilm" else
            f"{steps} steps; `sve train {out} --dry-run` estimates its memory")
    rows = ", ".join(f"{name} {count:,}" for name, count in proposal.rows.items())
    dataset = f'"{data}"'
    return f"""# SVE (M=4) on your data, proposed by `sve init --data {data}` — check the columns, then train:
#
#   sve train {out} --dry-run     # rows and classes per split, steps, what max_length cuts, memory
#   sve train {out}
#   sve evaluate runs/{out.rsplit('/', 1)[-1].removesuffix('.yaml')}     # add --ood NAME=FILE: inputs it should not trust
#
# Data: {rows} rows ({proposal.splits}); {len(proposal.classes)} classes in '{proposal.label_field}':
# {', '.join(proposal.classes[:12])}{' …' if len(proposal.classes) > 12 else ''}. Text: '{proposal.text_field}'.
# max_length {proposal.max_length}: the 95th percentile of the training texts' tokens, at most {MAX_LENGTH_CAP}
# ({100 * proposal.cut_share:.1f}% are longer and cut). Cost: {cost}.
# The rest is recipes/quickstart.yaml's (docs/results.md): lr 3e-3, 2 epochs, every member its own order
# of the data; the ensemble's probabilities are calibrated on the validation split (eval.calibration).
model:
  path: {model}
task:
  type: text_classification
  dataset: {dataset}
  text_field: {proposal.text_field}
  label_field: {proposal.label_field}
  validation_split: "{proposal.validation_split}"
  max_length: {proposal.max_length}
ensemble:
  method: sve
  members: 4
  sigma_init: 0.01
  targets: all
  representation: auto
  dropout: false
train:
  epochs: 2
  batch_size: 16
  lr: 3.0e-3
  seed: 0
  member_batches: shuffled
eval:
  split: "{proposal.validation_split}"
  metric: accuracy
"""


def _render_generation(proposal: Proposal, data: str, out: str) -> str:
    train_rows = proposal.rows["train"] if proposal.validation_split == "validation" else int(0.9 * proposal.rows["train"])
    rows = ", ".join(f"{name} {count:,}" for name, count in proposal.rows.items())
    return f"""# SVE (M=4) generating '{proposal.label_field}' from '{proposal.text_field}', proposed by `sve init --data {data}`:
#
#   sve train {out} --dry-run --time     # splits, steps, memory (with each member's KV cache) and minutes
#   sve train {out}
#   sve evaluate runs/{out.rsplit('/', 1)[-1].removesuffix('.yaml')}     # answers the test split: ROUGE-L, and how well each uncertainty score flags a bad answer
#
# Data: {rows} rows ({proposal.splits}). max_length {proposal.max_length}: the prompts' 95th percentile of
# tokens (at most {MAX_LENGTH_CAP}; {100 * proposal.cut_share:.1f}% are longer and lose their start) plus the answers'
# {proposal.target_length} (95th percentile, at most {MAX_TARGET_CAP}). Cost: one epoch of {max(1, train_rows // 8)} steps of 8.
# The rest is recipes/smollm2_bbc_headlines.yaml's (docs/results.md §7): the upper third of the blocks'
# attention targeted (the blocks below run once for all members), relative singular values at lr
# {GENERATION_LR:g} — the rate whose validation answers were best there; `--set eval.metric=rouge_l` keeps the
# step whose validation answers are best (it decodes the validation split at each evaluation).
model:
  path: {proposal.model}
task:
  type: generation
  dataset: "{data}"
  prompt_field: {proposal.text_field}
  target_field: {proposal.label_field}
  validation_split: "{proposal.validation_split}"
  max_length: {proposal.max_length}
  max_target_length: {proposal.target_length}
ensemble:
  method: sve
  members: 4
  sigma_init: 0.01
  parameterisation: relative
  targets: attention@{proposal.first_target_block}-
train:
  epochs: 1
  batch_size: 8
  lr: {GENERATION_LR}
  seed: 0
eval:
  split: "{proposal.validation_split}"
  metric: nll
"""
