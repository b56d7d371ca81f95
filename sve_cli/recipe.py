"""Recipes: plain YAML validated into typed config.

Every problem in a file is reported at once, each naming its key and the file; unknown keys are
errors (`extra="forbid"`). YAML goes through a safe loader that also refuses duplicate keys and
aliases. `--set train.lr=3e-4` overrides are applied before validation, so they are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sve_cli.errors import SveError


class RecipeError(SveError):
    """A recipe file that cannot be read or validated."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    path: str = Field(description="checkpoint directory, .safetensors/.gguf, builtin:… or hub id")
    decomposition: Optional[str] = Field(None, description="decomposition cache; made on the fly when absent")
    trust_remote_code: bool = False


class TaskSection(_Section):
    type: Literal["text_classification", "multiple_choice", "image_classification"]
    dataset: str = Field(description="builtin:tweets|bbc_news|digits|mnist, a local file or folder, or a hub name")
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


class EnsembleConfig(_Section):
    """What the ensemble is: the recipe's `ensemble:` section, and `build_ensemble`'s argument."""

    method: Literal["sve", "svf", "single", "deep_ensemble", "lora_ensemble"] = "sve"
    members: int = Field(4, ge=1, le=256)
    sigma_init: float = Field(0.01, ge=0, description="relative init noise of each member's singular values "
                              "(sve/svf) or of its copies of the weights and copied heads (deep_ensemble)")
    parameterisation: Literal["clamp", "softplus"] = "clamp"
    targets: str = "all"
    strategy: Literal["auto", "factored", "materialised"] = "auto"
    bias: bool = Field(True, description="members own a bias on every target (False keeps LLaMA's layers bias-free)")
    dropout: bool = Field(True, description="keep the checkpoint's dropout while training (false: every "
                          "dropout probability in its config is set to 0)")
    representation: Literal["auto", "pooler", "cls", "mean", "max", "last_token"] = Field(
        "auto", description="what the heads read: auto = the checkpoint's own pooling (sentence-transformers "
        "config) or the architecture's HF classifier's")
    head_init: Literal["normal", "checkpoint"] = "normal"
    single_mode: Literal["full", "head"] = Field("full", description="single/deep_ensemble: train the "
                                                 "targeted layers fully, or the head only")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)

    @model_validator(mode="after")
    def _members_of_single_models(self) -> "EnsembleConfig":
        if self.method in ("svf", "single") and self.members != 1:
            raise ValueError(f"method '{self.method}' trains one model: set members: 1")
        return self

    @property
    def uses_decomposition(self) -> bool:
        return self.method in ("sve", "svf")

    @property
    def copy_jitter(self) -> float:
        """Relative noise on the deep ensemble's copies of pretrained tensors (weights, copied heads),
        so its members differ from the start as SVE's do; 0 for every other method."""
        return self.sigma_init if self.method == "deep_ensemble" and self.members > 1 else 0.0


class TrainSection(_Section):
    epochs: Optional[float] = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    sigma_lr: Optional[float] = Field(None, gt=0, description="learning rate of sigma (default: lr)")
    head_lr: Optional[float] = Field(None, gt=0, description="learning rate of the heads (default: lr); "
                                     "lets full fine-tuning use a small lr for weights and a large one for heads")
    weight_decay: float = Field(0.05, ge=0)
    sigma_weight_decay: Optional[float] = Field(None, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: Optional[float] = Field(1.0, gt=0)
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


class EvalSection(_Section):
    split: str = "validation"
    metric: Literal["accuracy", "nll", "ece", "brier"] = "accuracy"
    bins: int = Field(15, gt=0)
    batch_size: int = Field(64, gt=0)
    combine: Literal["probs", "logits"] = "probs"


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
        node[leaf] = yaml.load(value, Loader=_StrictLoader) if value.strip() else None
    return nested


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{key}: {message}" if key else message)  # cross-key checks name their keys
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{source}: {count}: " + "; ".join(problems)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge `--set` overrides, validate. Every error is one `RecipeError` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise RecipeError(f"recipe {path} is not a UTF-8 text file: {error}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with model, task, ensemble, train, eval")
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format(error, str(path))) from None


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe, as written into a run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
