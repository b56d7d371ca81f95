"""Which weights an SVE decomposes: a family's preset (`sve_cli.architectures`), or globs over parameter names.

`--targets` takes a preset (`all`, `attention`, `mlp` of the checkpoint's family, or a family name such as
`llama`) or comma-separated globs (`*.q_proj.weight,*.v_proj.weight`); a glob starting with `!` excludes.
A family sve has no spec for gets its presets inferred (every `nn.Linear`/`Conv1D` of its transformer
blocks). Embeddings, norms and heads are never in a preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from sve_cli.architectures import matches, resolve_patterns
from sve_cli.checkpoint import Checkpoint
from sve_cli.errors import TargetError



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


def resolve_targets(checkpoint: Checkpoint, spec: str | None = None) -> list[Target]:
    """Match the patterns against the checkpoint's tensor names; refuse non-matrices clearly."""
    patterns, family = resolve_patterns(spec, checkpoint)
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    if not include:
        raise TargetError("--targets names no pattern to include")
    for pattern in [] if family is not None else include:
        if not any(matches(name, [pattern]) for name in checkpoint.names):
            raise TargetError(f"target pattern '{pattern}' matches no tensor in {checkpoint.source}")
    targets = []
    for name in checkpoint.names:
        if not matches(name, include) or matches(name, exclude):
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
