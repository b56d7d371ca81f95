"""Recipes: plain YAML validated into typed config.

Every problem in a file is reported at once, each naming its key and the file; unknown keys are
errors (`extra="forbid"`). YAML goes through a safe loader that also refuses duplicate keys and
aliases. `--set train.lr=3e-4` overrides are applied before validation, so they are checked too.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sve_cli.errors import RecipeError, SveError
from sve_cli.methods import METHODS, Method
from sve_cli.vocabulary import EVAL_METRICS, REPRESENTATIONS, VALIDATION_METRICS


PROMPT_FIELDS = {"question", "choices"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")  # train-00000-of-00002.parquet: one split in shards
MAX_BINS = 10_000  # more bins than that is no calibration measure (and would only cost memory)
MAX_RECIPE_BYTES = 1_000_000
# of the target tokens (the members' mean distribution), or of the greedy answers to the validation prompts
GENERATION_METRICS = ("accuracy", "nll", "rouge_l")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(_Section):
    path: str = Field(description="checkpoint directory, .safetensors/.gguf, builtin:… or hub id")
    decomposition: Optional[str] = Field(None, description="decomposition cache; made on the fly when absent")
    trust_remote_code: bool = False


class TaskSection(_Section):
    type: Literal["text_classification", "multiple_choice", "image_classification", "generation"]
    dataset: Union[str, dict[str, Union[str, list[str]]]] = Field(
        description="builtin:tweets|bbc_news|bbc_headlines|digits|mnist, a local file, a folder (of split files named train.csv, "
        "validation.jsonl, … or an image folder), a mapping split name -> file(s), or a hub name")
    config: Optional[str] = Field(None, description="hub dataset configuration")
    train_split: str = "train"
    validation_split: str = Field("validation", description="a split name, or 'train:10%' to hold out a "
                                  "seeded share of the training split")
    test_split: str = "test"
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    image_field: str = "image"
    label_names: Optional[list[str]] = None
    max_length: int = Field(128, gt=0)
    image_size: Optional[int] = Field(None, gt=0)
    max_train_examples: Optional[int] = Field(None, gt=0)
    max_eval_examples: Optional[int] = Field(None, gt=0)
    # multiple choice: ARC-style items, or a classification set posed as a question
    letters: list[str] = Field(default_factory=lambda: list("ABCDEFGH"))
    prompt: str = "{question}\n{choices}\nAnswer:"
    question: Optional[str] = Field(None, description="poses a classification set as multiple choice, "
                                    "e.g. 'Which topic is this article about?'")
    # generation: prompt / target pairs; the loss is on the target's tokens (and the end-of-sequence token)
    prompt_field: str = "prompt"
    target_field: str = "target"
    target_delimiter: str = Field(" ", description="put between a prompt and its target unless the prompt ends "
                                  "in whitespace (as lm-evaluation-harness's target_delimiter)")
    max_target_length: int = Field(64, gt=0, description="target tokens kept (longer targets are cut)")

    @field_validator("dataset", mode="before")
    @classmethod
    def _name_or_mapping(cls, dataset):  # one line instead of one per branch of the union
        if not isinstance(dataset, (str, dict)):
            raise ValueError(f"expected a dataset name, a path or a mapping of split names to files, not {dataset!r}")
        return dataset

    @field_validator("dataset")
    @classmethod
    def _split_files_are_named(cls, dataset):
        if isinstance(dataset, dict):
            if not dataset:
                raise ValueError("a mapping of split names to files needs at least one split")
            for split, files in dataset.items():
                paths = [files] if isinstance(files, str) else files
                if not split.strip() or not paths or any(not str(path).strip() for path in paths):
                    raise ValueError(f"split '{split}' needs a file name (or a list of them)")
        return dataset

    @field_validator("letters")
    @classmethod
    def _letters_are_distinct(cls, letters: list[str]) -> list[str]:
        repeated = sorted({letter for letter in letters if letters.count(letter) > 1})
        if repeated:  # two classes would share one answer token in an exported causal LM
            raise ValueError(f"'{repeated[0]}' appears more than once: each class needs its own answer letter")
        if any(not letter.strip() for letter in letters):
            raise ValueError("an answer letter is empty")
        return letters

    @model_validator(mode="after")
    def _splits_exist(self) -> "TaskSection":
        """Split names are checked here, before any data is read: a name that looks like a file, or one
        that the split files (a mapping or a folder of split files) do not have, is refused."""
        files = split_files(self.dataset)
        problems = []
        for key in ("train_split", "validation_split", "test_split"):
            name = getattr(self, key)
            if Path(name).suffix.lower() in TABLE_SUFFIXES or "/" in name:
                example = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv",
                           key.removesuffix("_split"): name}
                problems.append(f"task.{key}: '{name}' looks like a file, but a split is a name; give split files "
                                "as a mapping, task.dataset: {" + ", ".join(f"{k}: {v}" for k, v in example.items())
                                + "}")
            elif files is not None and name not in files and carved_share(name, self.train_split) is None:
                hint = (" (or hold out a share of the training split: validation_split: 'train:10%')"
                        if key == "validation_split" else "")
                problems.append(f"task.{key}: split '{name}' is not among the split files {sorted(files)}{hint}")
        if problems:
            raise ValueError("\n".join(problems))  # one problem a line: `_format` counts them
        return self

    @property
    def dataset_name(self) -> str:
        """The dataset in words: its name, or `train=a.csv, test=b.csv` for split files."""
        if isinstance(self.dataset, str):
            return self.dataset
        return ", ".join(f"{split}={files if isinstance(files, str) else '+'.join(files)}"
                         for split, files in self.dataset.items())

    @property
    def local_paths(self) -> list[Path]:
        """The files and folders on this machine that the dataset is read from."""
        files = split_files(self.dataset)
        if files is not None:
            return [path for paths in files.values() for path in paths]
        path = Path(self.dataset).expanduser()
        return [path] if not self.dataset.startswith("builtin:") and path.exists() else []

    @field_validator("prompt")
    @classmethod
    def _prompt_fields_are_known(cls, prompt: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        except ValueError as error:
            raise ValueError(f"not a valid template ({error}); write literal braces as {{{{ and }}}}") from None
        unknown = sorted(fields - PROMPT_FIELDS)
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}} (the template may use {{question}} and {{choices}})")
        return prompt


def carved_share(name: str, train_split: str) -> int | None:
    """The percentage of `validation_split: 'train:10%'` (a seeded share held out of the training split)."""
    carved = re.fullmatch(r"(.+):(\d+)%", name)
    return int(carved.group(2)) if carved and carved.group(1) == train_split else None


def split_files(dataset: "str | dict") -> dict[str, list[Path]] | None:
    """The split files of a dataset given as files (Hugging Face's `data_files` convention): a mapping
    split name -> file(s), or a folder holding table files named after their splits (`train.csv`,
    `validation.jsonl`, `test-00000-of-00002.parquet`); None for every other kind of source."""
    if isinstance(dataset, dict):
        return {split: [Path(f).expanduser() for f in ([files] if isinstance(files, str) else files)]
                for split, files in dataset.items()}
    folder = Path(dataset).expanduser()
    if dataset.startswith("builtin:") or not folder.is_dir():
        return None
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in TABLE_SUFFIXES:
            found.setdefault(SHARD_SUFFIX.sub("", path.stem), []).append(path)
    return found or None


class EnsembleConfig(_Section):
    """What the ensemble is: the recipe's `ensemble:` section, and `build_ensemble`'s argument."""

    method: Literal[tuple(METHODS)] = "sve"
    members: int = Field(4, ge=1, le=256)
    sigma_init: float = Field(0.01, ge=0, description="relative init noise of each member's singular values "
                              "(sve/svf) or of its copies of the weights and copied heads (deep_ensemble)")
    parameterisation: Literal["relative", "clamp", "softplus"] = Field(
        "clamp", description="how members' singular values are trained: relative (S ⊙ relu(1 + sigma): "
        "steps and weight decay act relative to the pretrained spectrum), clamp (relu(sigma), the paper's code) "
        "or softplus")
    targets: str = "all"
    strategy: Literal["auto", "factored", "materialised"] = "auto"
    bias: bool = Field(False, description="members own a bias on every target, also where the base layer has "
                       "none (its family's classifier then cannot hold them: such a run exports as a Σ bank only); "
                       "by default members own a bias exactly where the base layer has one")
    dropout: bool = Field(True, description="keep the checkpoint's dropout while training (false: every "
                          "dropout probability in its config is set to 0)")
    representation: Literal[("auto", *REPRESENTATIONS)] = Field(
        "auto", description="what the heads read: auto = the checkpoint's own pooling (sentence-transformers "
        "config) or the architecture's HF classifier's")
    head_init: Literal["normal", "checkpoint"] = "normal"
    single_mode: Literal["full", "head"] = Field("full", description="single/deep_ensemble: train the "
                                                 "targeted layers fully, or the head only")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)

    @model_validator(mode="after")
    def _members_of_single_models(self) -> "EnsembleConfig":
        if METHODS[self.method].one_model and self.members != 1:
            raise ValueError(f"method '{self.method}' trains one model: set members: 1")
        return self

    @property
    def spec(self) -> Method:
        """The method's interface (sve_cli/methods.py)."""
        return METHODS[self.method]

    @property
    def uses_decomposition(self) -> bool:
        return self.spec.decomposed

    @property
    def trains_targets(self) -> bool:
        """False for single/deep-ensemble runs that train their heads only."""
        return self.spec.trains_targets(self)

    @property
    def copy_jitter(self) -> float:
        """Relative noise on a jittered method's copies of pretrained tensors (weights, copied heads), so its
        members differ from the start as SVE's do; 0 for every other method."""
        return self.sigma_init if self.spec.jittered and self.members > 1 else 0.0


class TrainSection(_Section):
    epochs: Optional[float] = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    lr: Union[float, Literal["auto"]] = Field(1e-3, description="the learning rate, or auto: sve train first "
                                              "trains each lr_grid value for lr_sweep_steps and keeps the one the "
                                              "validation split prefers (eval.metric; its cost is printed)")
    lr_grid: list[float] = Field(default_factory=lambda: [3e-3, 1e-2, 3e-2], min_length=1,
                                 description="the rates lr: auto tries")
    lr_sweep_steps: Optional[int] = Field(None, gt=0, description="steps each lr_grid value trains for lr: auto "
                                          "(default: a fifth of the run's steps, at least 10)")
    sigma_lr: Optional[float] = Field(None, gt=0, description="learning rate of sigma (default: lr)")
    head_lr: Optional[float] = Field(None, gt=0, description="learning rate of the heads (default: lr); "
                                     "lets full fine-tuning use a small lr for weights and a large one for heads")
    weight_decay: float = Field(0.05, ge=0)
    sigma_weight_decay: Optional[float] = Field(None, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: Optional[float] = Field(1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="the device the recipe is meant for: "
                                                   "`--dry-run` plans for it, and training refuses cuda without a GPU "
                                                   "(auto: a GPU when there is one)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on a GPU, frozen factors and "
                                                "weights stored in bf16, fp32 master copies of what trains")
    seed: int = 0
    member_batches: Literal["shared", "shuffled", "bootstrap"] = Field(
        "shared", description="shared: every member sees the same batch; shuffled: each member its own order "
        "of the data (same step cost); bootstrap: each member its own resample with replacement")
    members_per_pass: Optional[int] = Field(None, gt=0, description="run the members in chunks of this size "
                                            "(gradients accumulated; same result, less activation memory)")
    gradient_checkpointing: bool = Field(False, description="recompute each transformer block in the backward "
                                         "pass (same result, less activation memory)")
    eval_every_steps: Optional[int] = Field(None, gt=0)
    checkpoint_every_steps: int = Field(50, gt=0)
    log_tensorboard: bool = Field(False, description="also log loss, learning rates and validation metrics to "
                                  "RUN/tensorboard (needs the tensorboard package: pip install 'sve-cli[tensorboard]')")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp (every rank holds the whole "
                                                "model) or fsdp (weights, factors and what trains sharded across ranks)")

    @field_validator("lr", mode="before")
    @classmethod
    def _number_or_auto(cls, lr):  # one line instead of one per branch of the union
        if lr == "auto" or (isinstance(lr, (int, float)) and not isinstance(lr, bool)):
            return lr
        if isinstance(lr, str):  # "1e-2": YAML 1.1 and --set read it as a string
            try:
                return float(lr)
            except ValueError:
                pass
        raise ValueError(f"expected a number or auto, not {lr!r}")

    @field_validator("lr")
    @classmethod
    def _positive_rate(cls, lr):
        if lr != "auto" and not lr > 0:
            raise ValueError("a learning rate must be greater than 0 (or auto)")
        return lr

    @field_validator("lr_grid")
    @classmethod
    def _positive_rates(cls, grid: list[float]) -> list[float]:
        if any(not rate > 0 for rate in grid):
            raise ValueError("every rate of the grid must be positive")
        return grid


class EvalSection(_Section):
    split: str = "validation"
    metric: Literal[EVAL_METRICS] = Field(
        "accuracy", description="what picks the kept step (and lr: auto's rate) on the validation split. rouge_l "
        "(generation): the ensemble answers every validation prompt greedily, its answers' mean ROUGE-L against the "
        "references — what a user of the answers wants, at the cost of decoding the split at each evaluation")
    bins: int = Field(15, gt=0, le=MAX_BINS)
    batch_size: int = Field(64, gt=0)
    combine: Literal["probs", "logits"] = "probs"
    calibration: Literal["temperature", "none"] = Field(
        "temperature", description="temperature: at the end of training fit one temperature on the validation split "
        "(the ensemble's combined prediction; and one per member, for exports); evaluate, predict and exported members "
        "hand out calibrated probabilities. none: raw probabilities everywhere")
    cache_budget: str = Field("auto", description="memory the eval weight cache (every member's dense weights) may "
                              "use: auto = a quarter of the free GPU memory or RAM, 0 = never, or a size (4GB); past it "
                              "evaluation takes the factored path")

    @field_validator("cache_budget")
    @classmethod
    def _a_size(cls, value: str) -> str:
        from sve_cli.writing import parse_size

        if value != "auto":
            try:
                parse_size(value)
            except SveError as error:
                raise ValueError(str(error)) from None
        return value


class Recipe(_Section):
    model: ModelSection
    task: TaskSection
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _eval_split_is_a_task_split(self) -> "Recipe":
        splits = (self.task.train_split, self.task.validation_split, self.task.test_split)
        if self.eval.split not in splits:
            raise ValueError(f"eval.split '{self.eval.split}' is none of the task's splits {list(splits)}")
        return self

    @model_validator(mode="after")
    def _generation_settings(self) -> "Recipe":
        """Generation scores target tokens: members share each batch (their targets line up row for row),
        and validation measures token accuracy or NLL, or the answers' ROUGE-L."""
        if self.task.type != "generation":
            if self.eval.metric not in VALIDATION_METRICS:
                raise ValueError(f"eval.metric: {self.eval.metric} judges generated answers, and this is a "
                                 f"{self.task.type} recipe (validated by {', '.join(VALIDATION_METRICS)})")
            return self
        problems = []
        if self.train.member_batches != "shared":
            problems.append("train.member_batches: generation trains every member on the same batches (shared)")
        if self.eval.metric not in GENERATION_METRICS:
            problems.append(f"eval.metric: generation is validated by {', '.join(GENERATION_METRICS)} "
                            "(the target tokens' accuracy or NLL, or the greedy answers' ROUGE-L)")
        if not self.ensemble.trains_targets:
            problems.append("ensemble.single_mode: head trains nothing in generation (the LM head is shared and "
                            "frozen): use single_mode: full")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys and anchors/aliases."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in recipes",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.lr=3e-4', 'ensemble.members=8'] -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set '{override}' is not key.path=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set '{override}' conflicts with another --set")
        try:
            node[leaf] = yaml.load(value, Loader=_StrictLoader) if value.strip() else None
        except (yaml.YAMLError, RecursionError):
            raise RecipeError(f"--set '{override}': the value is not valid YAML") from None
    return nested


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validation_line(error: ValidationError, source: str = "") -> str:
    """Every problem of a validation error on one line, each naming its key."""
    return _format(error, source or error.title)


def _format(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        for line in message.splitlines():
            named = not key or line.startswith(f"{key}.")  # cross-key checks name their keys
            problems.append(line if named else f"{key}: {line}")
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{source}: {count}: " + "; ".join(problems)


SHIPPED = Path(__file__).resolve().parent / "recipes"  # package data: they come with `pip install`


def shipped_recipes() -> dict[str, tuple[Path, str]]:
    """Name -> (file, the first line of its comment header) of every recipe that ships with sve."""
    recipes = {}
    for path in sorted(SHIPPED.glob("*.yaml")):
        header = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            header.append(line.strip("# "))
        sentence = re.split(r"(?<=\.)\s", " ".join(header), maxsplit=1)[0].rstrip(".:")
        recipes[path.stem] = (path, sentence if len(sentence) <= 100 else sentence[:99].rstrip() + "…")
    return recipes


def find_recipe(name: str | Path) -> Path:
    """A local recipe file, else a shipped recipe named `quickstart`, `quickstart.yaml` or
    `recipes/quickstart.yaml` (what the docs write, which works outside a clone too)."""
    path = Path(name)
    if path.exists():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_recipes()
    if stem in shipped and (path.parent == Path(".") or path.parent.name == "recipes"):
        return shipped[stem][0]
    raise RecipeError(f"recipe {name} does not exist (nor is it a shipped recipe: {', '.join(shipped)}; "
                      "`sve recipes` lists them)")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge `--set` overrides, validate. Every error is one `RecipeError` line."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist")
    if not path.is_file() or path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is not a YAML file (a regular file of at most 1 MB)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe {path} is not a UTF-8 text file: {error}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{line}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with model, task, ensemble, train, eval")
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format(error, str(path))) from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None


RUN_RECIPE_HEADER = "# the resolved recipe of an sve run (written by `sve train`)\n"


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe, as written into a run directory (its first line marks the run as sve's)."""
    return RUN_RECIPE_HEADER + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
