"""From a recipe to a model and encoded inputs: tokenizer, answer letters, ensemble, encoding
(`Encoded`: a split as model inputs, padded batch by batch).

Shared by `train` and `evaluate`, so a run is always evaluated with exactly the preprocessing it
was trained with.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from sve_cli.bank import load_bank, read_bank_metadata
from sve_cli.architectures import architecture, check_config
from sve_cli.checkpoint import open_checkpoint, quiet_transformers
from sve_cli.data import Examples, splits_summary
from sve_cli.decompose import decomposition_for
from sve_cli.ensemble import SVEModel, build_ensemble
from sve_cli.errors import ForeignDecompositionError, SveError
from sve_cli.images import pixel_values
from sve_cli.recipe import EnsembleConfig, Recipe

OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")  # position ids start at pad_token_id + 1
log = logging.getLogger("sve")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def letter_token_id(tokenizer, letter: str) -> int:
    """The single token that follows "Answer:" for this letter (" A" in BPE vocabularies)."""
    for text in (" " + letter, letter):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            return ids[0]
    raise SveError(f"answer letter '{letter}' is not a single token for this tokenizer")


def load_tokenizer(directory: Path, source: str, trust_remote_code: bool = False):
    """The tokenizer beside a checkpoint (with a pad token), or one clear error."""
    from transformers import AutoTokenizer

    # transformers would build an empty-vocabulary tokenizer (everything becomes [UNK]) rather
    # than fail when a checkpoint ships none: refuse that here
    if not any((directory / name).exists() for name in VOCABULARY_FILES):
        raise SveError(f"no tokenizer beside {source} (none of {', '.join(VOCABULARY_FILES)})")
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise SveError(f"no usable tokenizer beside {source}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensemble_for(model: str, config: EnsembleConfig, decomposition: Path | None = None, **options) -> SVEModel:
    """`build_ensemble` with the decomposition resolved first: `decomposition`, or sve's default cache of
    `model` (made when absent, brought up to date when the model's weights changed). `options` are
    build_ensemble's (classes or letter_token_ids, pad_token_id, seed, trust_remote_code)."""
    if not config.uses_decomposition:
        return build_ensemble(model, config, **options)
    checkpoint = open_checkpoint(model)
    check_config(checkpoint, architecture(checkpoint))  # a config that cannot build the model: before any SVD
    factors = decomposition_for(model, decomposition, config.targets)
    try:
        return build_ensemble(model, config, factors=factors, **options)
    except ForeignDecompositionError:
        if decomposition is not None:
            raise  # the user's own cache: theirs to remake
        return build_ensemble(model, config, factors=decomposition_for(model, None, config.targets, refresh=True),
                              **options)


def load_ensemble(recipe: Recipe, bank: Path) -> tuple["Pipeline", SVEModel, dict]:
    """The ensemble `bank` holds, built on `recipe`'s preprocessing, in eval mode; and the bank's metadata."""
    metadata = read_bank_metadata(bank)
    if not isinstance(metadata.get("label_names"), list):
        raise SveError(f"{bank} does not name its labels (a bank saved without label_names); "
                       "evaluate or predict with banks that `sve train` wrote")
    pipeline = Pipeline(recipe)
    model = pipeline.build_model(list(metadata["label_names"]))
    load_bank(model, bank)
    return pipeline, model.eval(), metadata


class Pipeline:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.checkpoint = open_checkpoint(recipe.model.path)
        self.config = self.checkpoint.config
        self.tokenizer = None
        if recipe.task.type != "image_classification":
            self.tokenizer = load_tokenizer(self.checkpoint.directory, recipe.model.path, recipe.model.trust_remote_code)
            self.max_length = self._checked_max_length(recipe.task.max_length)
        self.letters: list[str] | None = None

    def _checked_max_length(self, asked: int) -> int:
        """`task.max_length`, within what the model can read: clamped (said once) to its positions, since
        a longer input would crash the forward; refused below the tokens the tokenizer adds by itself."""
        special = self.tokenizer.num_special_tokens_to_add(pair=bool(self.recipe.task.text_pair_field))
        if asked <= special:
            raise SveError(f"task.max_length {asked} leaves no room for text: this tokenizer adds {special} special "
                           f"token(s) to every input; use at least {special + 1}")
        positions = self.config.get("max_position_embeddings") or self.config.get("n_positions")
        if isinstance(positions, int) and self.config.get("model_type") in OFFSET_POSITIONS:
            positions -= int(self.config.get("pad_token_id") or 0) + 1  # RoBERTa's positions start after padding
        if isinstance(positions, int) and 0 < positions < asked:
            log.info("task.max_length %d is more than %s reads (%d positions): inputs are cut at %d tokens",
                     asked, self.recipe.model.path, positions, positions)
            return positions
        return asked

    def build_model(self, label_names: list[str]) -> SVEModel:
        recipe = self.recipe
        common = {"decomposition": Path(recipe.model.decomposition) if recipe.model.decomposition else None,
                  "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer is not None else None,
                  "seed": recipe.train.seed, "trust_remote_code": recipe.model.trust_remote_code}
        if recipe.task.type == "multiple_choice":
            self.letters = recipe.task.letters[:len(label_names)]
            ids = [letter_token_id(self.tokenizer, letter) for letter in self.letters]
            return ensemble_for(recipe.model.path, recipe.ensemble, letter_token_ids=ids, **common)
        if recipe.task.type == "generation":
            return ensemble_for(recipe.model.path, recipe.ensemble, tokens=True, **common)
        return ensemble_for(recipe.model.path, recipe.ensemble, classes=len(label_names), **common)

    def cut_share(self, examples: Examples, sample: int = 2000) -> float | None:
        """The share of inputs longer than the tokens this run reads (`max_length`), on a seeded sample;
        None for images."""
        if examples.texts is None:
            return None
        rows = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:sample].tolist()
        if examples.targets is not None:  # prompt, delimiter, target and end-of-sequence token
            sample_examples = Examples(examples.labels[rows], texts=[examples.texts[i] for i in rows],
                                       targets=[examples.targets[i] for i in rows])
            full = generation_ids(self.tokenizer, sample_examples, 10**9, 10**9, self.recipe.task.target_delimiter)[0]
            return sum(len(ids) > self.max_length for ids in full) / len(full)
        texts = [examples.texts[i] for i in rows]
        pairs = [examples.pairs[i] for i in rows] if examples.pairs else None
        lengths = [len(ids) for ids in self.tokenizer(texts, pairs, truncation=False)["input_ids"]]
        return sum(length > self.max_length for length in lengths) / len(lengths)

    def data_notes(self, splits: dict[str, Examples], label_names: list[str]) -> list[str]:
        """What `sve train` and `--dry-run` say about the data before training: rows and classes per
        split, steps, and how many inputs `max_length` cuts."""
        task, train = self.recipe.task, self.recipe.train
        notes = [splits_summary(task, splits)]
        for name, examples in splits.items():
            if task.type == "generation":
                continue  # no classes to count
            counts = torch.bincount(examples.labels, minlength=len(label_names)).tolist()
            notes.append(f"classes in {name}: " + ", ".join(f"{label} {count:,}" for label, count in zip(label_names, counts)))
        rows = len(splits[task.train_split])
        per_epoch = rows // train.batch_size // train.gradient_accumulation
        total = train.max_steps or max(1, math.ceil((train.epochs or 1) * per_epoch))
        notes.append(f"steps: {total:,} ({per_epoch:,} per epoch of {rows:,} rows, batch {train.batch_size}"
                     f"{f' × accumulation {train.gradient_accumulation}' if train.gradient_accumulation > 1 else ''}"
                     f" × {self.recipe.ensemble.members} member(s))")
        share = self.cut_share(splits[task.train_split])
        if share is not None:
            side = ("left (the question is kept)" if task.type == "multiple_choice" else
                    "left of the prompt (the target is kept)" if task.type == "generation" else "right")
            notes.append(f"max_length {self.max_length}: {100 * share:.1f}% of training inputs are longer and cut "
                         f"from the {side}" + (" — raise task.max_length if that loses what decides the label"
                                               if share > 0.25 else ""))
        return notes

    def encode(self, examples: Examples) -> Encoded:
        task = self.recipe.task
        if task.type == "image_classification":
            if examples.images is None:
                raise SveError("this run classifies images, but the data holds text")
            return Encoded(examples, pixels=pixel_values(examples.images, self.checkpoint.directory, self.config,
                                                         task.image_size))
        if task.type == "generation":
            return Encoded(examples, self.tokenizer, self.max_length, max_target_length=task.max_target_length,
                           target_delimiter=task.target_delimiter)
        return Encoded(examples, self.tokenizer, self.max_length, truncate_left=task.type == "multiple_choice")


def generation_ids(tokenizer, examples: Examples, max_length: int, max_target_length: int,
                   delimiter: str) -> tuple[list[list[int]], list[int]]:
    """Each example as `prompt + delimiter + target + EOS` token ids (the target cut to `max_target_length`
    tokens, EOS included; then the prompt cut from the left to fit `max_length`), and each prompt's length."""
    prompts = tokenizer(examples.texts)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    joined = [target if not delimiter or not prompt or prompt[-1:].isspace() or target[:1].isspace()
              else delimiter + target for prompt, target in zip(examples.texts, examples.targets)]
    targets = tokenizer(joined, add_special_tokens=False)["input_ids"]
    rows, prompt_lengths = [], []
    for index, (prompt, target) in enumerate(zip(prompts, targets)):
        if not prompt:
            raise SveError(f"example {index}: its prompt has no tokens (an empty '{examples.texts[index]}')")
        target = (target + eos)[:max_target_length]
        prompt = prompt[-max(1, max_length - len(target)):]
        rows.append(prompt + target)
        prompt_lengths.append(len(prompt))
    return rows, prompt_lengths


class Encoded:
    """A split turned into model inputs; `batch(indices)` pads to the batch's longest row."""

    def __init__(self, examples: Examples, tokenizer=None, max_length: int = 128, truncate_left: bool = False,
                 pixels: torch.Tensor | None = None, max_target_length: int = 64, target_delimiter: str = " "):
        self.labels = examples.labels  # [N]
        self.images = pixels  # [N, C, H, W], preprocessed (sve_cli.images)
        self.prompt_lengths: list[int] | None = None  # generation: each row's prompt tokens (the rest is its target)
        if examples.images is not None:
            if pixels is None:
                raise SveError("images need pixel values from the model's image processor")
            return
        if tokenizer is None:
            raise SveError("text data needs a tokenizer; this model has none")
        self.pad_token_id = tokenizer.pad_token_id
        if examples.targets is not None:
            self.input_ids, self.prompt_lengths = generation_ids(tokenizer, examples, max_length, max_target_length,
                                                                 target_delimiter)
            self.token_type_ids = None
            return
        tokenizer.truncation_side = "left" if truncate_left else "right"
        encoded = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.token_type_ids: list[list[int]] | None = encoded.get("token_type_ids")

    def __len__(self) -> int:
        return len(self.labels)

    def tokens(self, indices: torch.Tensor) -> int:
        """Real (unpadded) tokens in these rows, for throughput reporting."""
        if self.images is not None:
            return len(indices)
        return sum(len(self.input_ids[i]) for i in indices.tolist())

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.images is not None:
            return {"pixel_values": self.images[indices]}
        rows = [self.input_ids[i] for i in indices.tolist()]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row_index, row in enumerate(rows):  # right padding, as HF's classifiers expect
            input_ids[row_index, :len(row)] = torch.tensor(row)
            attention_mask[row_index, :len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.prompt_lengths is not None:  # at position t, the token t + 1 where it is a target's
            target_ids = torch.full_like(input_ids, -100)
            for row_index, i in enumerate(indices.tolist()):
                row, start = rows[row_index], self.prompt_lengths[i]
                target_ids[row_index, start - 1:len(row) - 1] = torch.tensor(row[start:])
            batch["target_ids"] = target_ids
        if self.token_type_ids is not None:
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for row_index, i in enumerate(indices.tolist()):
                types[row_index, :len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i])
            batch["token_type_ids"] = types
        return batch
