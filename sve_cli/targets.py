"""Which weights an SVE decomposes: presets by architecture, or globs over parameter names.

A preset is chosen from `config.json`'s `model_type`. `--targets` takes a preset name
(`all`, `attention`, `mlp`, or an architecture name such as `llama`) or comma-separated globs
(`*.q_proj.weight,*.v_proj.weight`); a glob starting with `!` excludes. Embeddings, norms and the LM head are never in a preset.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sve_cli.checkpoint import Checkpoint
from sve_cli.errors import TargetError

_DECODER = {
    "attention": ["*.self_attn.q_proj.weight", "*.self_attn.k_proj.weight",
                  "*.self_attn.v_proj.weight", "*.self_attn.o_proj.weight"],
    "mlp": ["*.mlp.gate_proj.weight", "*.mlp.up_proj.weight", "*.mlp.down_proj.weight"],
}
_BERT = {
    "attention": ["*.attention.self.query.weight", "*.attention.self.key.weight",
                  "*.attention.self.value.weight", "*.attention.output.dense.weight"],
    "mlp": ["*.intermediate.dense.weight", "*[0-9].output.dense.weight"],
}
_VIT = {
    "attention": ["*.attention.attention.query.weight", "*.attention.attention.key.weight",
                  "*.attention.attention.value.weight", "*.attention.output.dense.weight"],
    "mlp": ["*.intermediate.dense.weight", "*[0-9].output.dense.weight"],
}
_DINOV2 = {"attention": _VIT["attention"], "mlp": ["*.mlp.fc1.weight", "*.mlp.fc2.weight"]}
PRESETS: dict[str, dict[str, list[str]]] = {
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "dinov2": _DINOV2,
    "vit": _VIT,  # names as ViT checkpoints store them on disk (transformers renames on load)
}
PARTS = ("all", "attention", "mlp")


@dataclass(frozen=True)
class Target:
    """One weight matrix to decompose: `W [out, in]`, thin SVD rank `k = min(out, in)`."""

    name: str  # parameter name, e.g. "encoder.layer.0.attention.self.query.weight"
    out_features: int
    in_features: int
    dtype: str

    @property
    def k(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    def factor_bytes(self, element_size: int) -> int:
        """Bytes of U [out,k] + S [k] + Vh [k,in] at `element_size` bytes per value."""
        return element_size * self.k * (self.out_features + 1 + self.in_features)


def preset_patterns(spec: str | None, model_type: str | None) -> list[str]:
    """Glob patterns for a `--targets` value (None means the architecture's full preset)."""
    spec = (spec or "all").strip()
    if spec in PRESETS:
        model_type, spec = spec, "all"
    if spec not in PARTS:
        return [pattern.strip() for pattern in spec.split(",") if pattern.strip()]
    if model_type not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise TargetError(
            f"no target preset for model_type '{model_type}' (presets: {known}); "
            "pass --targets with globs such as '*.q_proj.weight,*.v_proj.weight'"
        )
    family = PRESETS[model_type]
    return family["attention"] + family["mlp"] if spec == "all" else list(family[spec])


def resolve_targets(checkpoint: Checkpoint, spec: str | None = None) -> list[Target]:
    """Match the patterns against the checkpoint's tensor names; refuse non-matrices clearly."""
    patterns = preset_patterns(spec, checkpoint.model_type)
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    if not include:
        raise TargetError("--targets names no pattern to include")
    is_preset = (spec or "all").strip() in PRESETS or (spec or "all").strip() in PARTS
    for pattern in [] if is_preset else include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in checkpoint.names):
            raise TargetError(f"target pattern '{pattern}' matches no tensor in {checkpoint.source}")
    targets = []
    for name in checkpoint.names:
        matches = any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        if not matches or any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        shape = checkpoint.shape(name)
        if len(shape) != 2:
            raise TargetError(
                f"target '{name}' has shape {list(shape)}: only 2-D weight matrices can be decomposed"
            )
        targets.append(Target(name, shape[0], shape[1], checkpoint.dtype(name)))
    if not targets:
        raise TargetError(f"the '{spec or 'all'}' preset matches no tensor in {checkpoint.source}")
    return targets
