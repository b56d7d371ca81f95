"""Know before you run: a recipe's trainable parameters, bytes and estimated peak memory.

`estimate_memory` reads only shapes and the config (no weight is loaded) and adds up:

- frozen weights: every backbone tensor the ensemble keeps (targets of SVE are replaced by their
  factors), 2 bytes each under `precision: bf16` on a GPU, else 4;
- factors: `U [out,k]` and `Vh [k,in]` of every SVE target, in the same dtype;
- what trains: parameters, gradients and AdamW's two moments in float32 (16 bytes a parameter);
- activations kept for the backward pass, per token of a pass (`members_per_pass × batch × length`
  rows) and per transformer block: `ACTIVATIONS` elements, plus `2k` per SVE target on the factored
  path or a materialised `[m, out, in]` weight on the other; with gradient checkpointing only each
  block's input is kept, and one block is recomputed at a time; and the backward pass's own
  buffers, `BACKWARD_BLOCKS` blocks' worth. Two constants depend on the device (2026-11-26): on
  CPU they were fitted to the peak RSS of runs of a 4-block LLaMA and BERT (hidden 256; BERT's
  dropout keeps attention probabilities and masks; freed memory stays in the process), every
  estimate within 25% (tests/test_memory.py); on an H100 to `max_memory_allocated` of 1- and
  2-block LLaMA-2-7B-shaped runs (flash attention, a caching allocator that reuses freed blocks),
  every estimate within +8% (benchmarks/llm_memory.py, docs/results.md).
- the runtime: the interpreter and libraries (CPU, measured in this process) or the CUDA context.

The CPU peak is also bounded below by building the model, when the whole float32 backbone and
the factors are in memory at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from sve_cli.architectures import BackboneLayout, architecture
from sve_cli.checkpoint import Checkpoint, open_checkpoint
from sve_cli.heads import resolve_representation
from sve_cli.layer import strategy_costs
from sve_cli.recipe import Recipe
from sve_cli.targets import Target, block_index, resolve_targets

# elements kept per token per block, as multiples of hidden (h) and intermediate (i) sizes
ACTIVATIONS = {"decoder": (10.0, 3.0), "encoder": (14.4, 3.2)}
KEPT_SHARE = {"cpu": 1.0, "cuda": 0.8}  # of those, what the device's attention and kernels really keep
BACKWARD_BLOCKS = {"cpu": 3.0, "cuda": 0.3}  # gradients and temporaries of the block being differentiated
CUDA_CONTEXT = 600_000_000  # bytes the CUDA runtime and its kernels hold outside PyTorch's allocator
ADAM_BYTES = 16  # float32 parameter + gradient + two moments
HEADROOM = 0.10  # a plan fits when its peak leaves this share of the memory free
GATHERED_BLOCKS = 2  # FSDP gathers one block and prefetches the next
BLOCK_NAME = re.compile(r"\.\d+\.")  # a tensor inside a numbered transformer block


@dataclass
class MemoryEstimate:
    device: str
    trainable_parameters: int
    base_parameters: int
    frozen_weight_bytes: int
    factor_bytes: int
    trainable_bytes: int
    activation_bytes: int
    runtime_bytes: int
    build_bytes: int
    capacity: int | None = None
    world: int = 1
    sharded: bool = False
    inference_bytes: int = 0  # `sve evaluate` / `sve predict` on the same ranks (plus at most the eval cache budget)
    suggestions: list[str] = field(default_factory=list)

    @property
    def training_bytes(self) -> int:
        return (self.frozen_weight_bytes + self.factor_bytes + self.trainable_bytes + self.activation_bytes
                + self.runtime_bytes)

    @property
    def peak_bytes(self) -> int:
        return max(self.training_bytes, self.build_bytes)

    @property
    def fits(self) -> bool | None:
        """Fits with at least 10% headroom; None when the capacity is unknown."""
        return None if self.capacity is None else self.peak_bytes <= (1 - HEADROOM) * self.capacity


def _blocks(config: dict) -> int:
    return int(config.get("num_hidden_layers") or config.get("n_layer") or 1)


def _trainable(recipe: Recipe, targets: list[Target], checkpoint: Checkpoint, classes: int) -> int:
    ensemble, members, spec = recipe.ensemble, recipe.ensemble.members, architecture(checkpoint)
    letters = recipe.task.type in ("multiple_choice", "generation")  # generation: no head trains (classes = 0)
    representation = "last_token" if letters else resolve_representation(ensemble.representation, spec,
                                                                          checkpoint.directory)
    hidden = int(checkpoint.config.get("hidden_size", 0))
    if representation == "pooler" and spec.stem.size_key:
        hidden = int(checkpoint.config.get(spec.stem.size_key) or hidden)
    hidden *= 2 if representation == "cls_mean" else 1
    head = members * classes * (hidden + (0 if letters or spec.head[1] is None else 1))
    if not ensemble.trains_targets:
        return head
    per_member = 0
    conv1d = spec.conv1d  # GPT-2 stores W as [in, out]
    for t in targets:
        has_bias = f"{t.module}.bias" in checkpoint.files
        outputs = t.in_features if conv1d else t.out_features
        per_member += ensemble.spec.values_per_target(t, outputs, has_bias, ensemble)
    return members * per_member + head


def _activation_bytes(recipe: Recipe, targets: list[Target], config: dict, decoder: bool, tokens: int,
                      members: int, element: int, device: str) -> int:
    """Bytes kept for backward in one pass of `tokens` rows (`members` members at once)."""
    hidden = int(config.get("hidden_size", 0))
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    blocks = _blocks(config)
    targeted = {block_index(target.name) for target in targets} - {None}
    # nothing below the first targeted block needs a gradient, so those blocks keep nothing for backward
    trained = blocks - min(targeted, default=0) if targeted else blocks
    per_hidden, per_intermediate = ACTIVATIONS["decoder" if decoder else "encoder"]
    per_token = per_hidden * hidden + per_intermediate * intermediate  # one block, dense layers
    per_block_extra = 0.0  # SVE's own saved tensors, one block
    if recipe.ensemble.uses_decomposition:
        for target in targets[: max(1, len(targets) // max(1, len(targeted)))]:  # the targets of one block
            costs = strategy_costs(members, tokens // members, target.out_features, target.in_features, target.k,
                                   training=True)
            strategy = recipe.ensemble.strategy if recipe.ensemble.strategy != "auto" else min(costs, key=costs.get)
            if strategy == "factored":
                per_block_extra += 2 * target.k * tokens
            else:
                per_block_extra += members * target.out_features * target.in_features
    block = per_token * tokens + per_block_extra
    kept, backward = KEPT_SHARE[device] * block, BACKWARD_BLOCKS[device] * block
    if recipe.train.gradient_checkpointing:  # block inputs kept, one block's activations rebuilt at a time
        return int(element * (trained * hidden * tokens + kept + backward))
    return int(element * (trained * kept + backward))


def _process_rss() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def estimate_memory(recipe: Recipe, classes: int, device: str = "cpu", capacity: int | None = None,
                    world: int = 1, suggest: bool = True) -> MemoryEstimate:
    """Estimated peak memory of training `recipe` (with `classes` output classes) on `device`, per rank of
    `world` (each rank takes batch_size / world rows; under `parallelism: fsdp` weights, factors and what
    trains are split across the ranks, plus the blocks gathered at a time); when it does not fit
    `capacity`, the first option set that would make it fit."""
    checkpoint = open_checkpoint(recipe.model.path, shapes_only=True)
    config, spec = checkpoint.config, architecture(checkpoint)
    ensemble, train = recipe.ensemble, recipe.train
    targets = resolve_targets(checkpoint, ensemble.targets)
    target_names = {t.name for t in targets}
    low = train.precision == "bf16" and device == "cuda"
    element = 2 if low else 4

    backbone = {name: math.prod(checkpoint.shape(name)) for name in BackboneLayout(spec, checkpoint.names).backbone()}
    base_parameters = sum(math.prod(checkpoint.shape(name)) for name in checkpoint.names)
    sve = ensemble.uses_decomposition
    replaced = sve or (ensemble.spec.dense and ensemble.trains_targets)  # the member layers hold the targets
    frozen = sum(n for name, n in backbone.items() if not (replaced and name in target_names))
    factors = sum(t.k * (t.out_features + t.in_features) for t in targets) if sve else 0
    trainable = _trainable(recipe, targets, checkpoint, classes)

    members_per_pass = min(train.members_per_pass or ensemble.members, ensemble.members)
    rows = train.batch_size // world
    tokens = members_per_pass * rows * (recipe.task.max_length if recipe.task.type != "image_classification"
                                        else _patches(config, recipe))
    activations = _activation_bytes(recipe, targets, config, spec.decoder, tokens, members_per_pass, element,
                                    "cuda" if device == "cuda" else "cpu")
    runtime = CUDA_CONTEXT if device == "cuda" else _process_rss()
    build = 4 * (sum(backbone.values()) + factors) + runtime if device == "cpu" else 0
    frozen_bytes, factor_bytes, trainable_bytes = element * frozen, element * factors, ADAM_BYTES * trainable
    if world > 1 and train.parallelism == "fsdp":
        blocks = _blocks(config)
        in_blocks = sum(n for name, n in backbone.items() if BLOCK_NAME.search(name)
                        and not (replaced and name in target_names))
        gathered = GATHERED_BLOCKS * element * (in_blocks + factors) / blocks  # the blocks unsharded at a time
        root = element * (frozen - in_blocks)  # embeddings and final norm: the root stays gathered
        frozen_bytes = int(element * frozen / world + root * (1 - 1 / world) + gathered)
        factor_bytes, trainable_bytes = factor_bytes // world, trainable_bytes // world
        build = 0  # each rank builds then shards; the whole model never waits for its shards on one rank
    eval_tokens = members_per_pass * max(1, recipe.eval.batch_size // world) * (tokens // max(1, members_per_pass * rows))
    per_hidden, per_intermediate = ACTIVATIONS["decoder" if spec.decoder else "encoder"]
    hidden, intermediate = int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))
    eval_activations = int(2 * element * eval_tokens * (per_hidden * hidden + per_intermediate * intermediate))
    if recipe.task.type == "generation":  # the shared LM head's copy, target-token logits, a KV cache per member
        vocabulary, width = int(config.get("vocab_size", 0)), int(config.get("hidden_size", 0))
        logits = 4 * members_per_pass * rows * recipe.task.max_target_length * vocabulary
        frozen_bytes += 4 * vocabulary * width
        activations += 3 * logits  # logits, their log-softmax, its gradient (float32)
        heads = int(config.get("num_attention_heads") or 1)
        kv_width = int(config.get("num_key_value_heads") or heads) * int(config.get("head_dim") or width // heads)
        cache = (2 * _blocks(config) * ensemble.members * recipe.eval.batch_size * kv_width * element
                 * (recipe.task.max_length + recipe.task.max_target_length))
        eval_activations += cache + 2 * logits * recipe.eval.batch_size // max(1, rows)
    inference = frozen_bytes + factor_bytes + trainable_bytes // 4 + eval_activations + runtime  # no grads, no moments
    estimate = MemoryEstimate(device, trainable, base_parameters, frozen_bytes, factor_bytes,
                              trainable_bytes, activations, runtime, build, capacity, world=world,
                              sharded=world > 1 and train.parallelism == "fsdp", inference_bytes=inference)
    if suggest:
        estimate.suggestions = _suggestions(recipe, estimate, classes, device, capacity, world)
    return estimate


def _patches(config: dict, recipe: Recipe) -> int:
    size = recipe.task.image_size or int(config.get("image_size", 224))
    return (size // int(config.get("patch_size", 16))) ** 2 + 1


def _suggestions(recipe: Recipe, estimate: MemoryEstimate, classes: int, device: str, capacity: int | None,
                 world: int) -> list[str]:
    """The first of the memory options (cheapest first) that makes a recipe that does not fit fit."""
    if capacity is None or estimate.fits:
        return []
    candidates = []
    if recipe.train.precision != "bf16" and device == "cuda":
        candidates.append({"precision": "bf16"})
    if not recipe.train.gradient_checkpointing:
        candidates.append({"gradient_checkpointing": True})
    for per_pass in (8, 4, 2, 1):
        if per_pass < (recipe.train.members_per_pass or recipe.ensemble.members):
            candidates.append({"gradient_checkpointing": True, "members_per_pass": per_pass})
    smallest = None
    for changes in candidates:
        changed = recipe.model_copy(update={"train": recipe.train.model_copy(update=changes)})
        trial = estimate_memory(changed, classes, device, capacity, world, suggest=False)
        options = " ".join(f"--set train.{key}={str(value).lower() if isinstance(value, bool) else value}"
                           for key, value in changes.items())
        if trial.fits:
            return [f"{options}  (estimated peak {trial.peak_bytes / 1e9:.1f} GB)"]
        if smallest is None or trial.peak_bytes < smallest[0]:
            smallest = (trial.peak_bytes, options)
    peak, options = smallest if smallest is not None else (estimate.peak_bytes, "as written")
    needed = peak / (1 - HEADROOM)
    where = "a GPU" if device == "cuda" else "a machine"
    lines = [f"nothing at {capacity / 1e9:.1f} GB; {options} needs {peak / 1e9:.1f} GB: {where} with "
             f"≥ {needed / 1e9:.0f} GB (10% headroom){', or --nproc N with train.parallelism: fsdp' if device == 'cuda' else ''}"]
    if device == "cpu" and recipe.train.precision == "bf16":
        lines.append("precision bf16 applies on a GPU only: plan it there with --device cuda --memory 80GB")
    return lines


def device_capacity(device: str) -> int | None:
    """Bytes this process could use: the GPU's memory, or the RAM available plus what it holds."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return available + _process_rss()


def plan_training(recipe: Recipe, device: str, capacity: int | None, world: int = 1) -> MemoryEstimate:
    """`sve train --dry-run`: nothing is built; the data is read only when the recipe does not say how
    many classes there are (label_names, or a multiple-choice task's letters), so planning a run on one
    of the paper's checkpoints works offline."""
    task = recipe.task
    if task.type == "generation":
        classes = 0  # the LM head is shared and frozen: no classes, no head to train
    elif task.label_names or task.type == "multiple_choice":
        classes = len(task.label_names or task.letters)
    else:
        from sve_cli.data import load_splits

        classes = len(load_splits(task, task.dataset_name)[1])
    return estimate_memory(recipe, classes, device, capacity, world)
