"""Which weights an SVE decomposes: a family's preset (`sve_cli.architectures`), or globs over parameter names.

`--targets` takes a preset (`all`, `attention`, `mlp` of the checkpoint's family, or a family name such as
`llama`) or comma-separated globs (`*.q_proj.weight,*.v_proj.weight`); a glob starting with `!` excludes.
Either may end in `@FIRST-LAST` (or `@FIRST-`), a range of blocks: only weights whose block index (the first
number in their name) lies in it, e.g. `attention@20-` for the upper third of SmolLM2's 30 blocks. The
blocks below the first targeted one are then computed once for all members (`sve_cli.prefix`).
A family sve has no spec for gets its presets inferred (every `nn.Linear`/`Conv1D` of its transformer
blocks). Embeddings, norms and heads are never in a preset.
"""

from __future__ import annotations

import re
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


def block_range(spec: str | None) -> tuple[str | None, range | None]:
    """`'attention@20-29'` -> (`'attention'`, range(20, 30)); `'@20-'` runs to the last block; no `@`: None."""
    if spec is None or "@" not in spec:
        return spec, None
    spec, _, blocks = spec.rpartition("@")
    found = re.fullmatch(r"\s*(\d+)\s*-\s*(\d*)\s*", blocks)
    if found is None or (found[2] and int(found[2]) < int(found[1])):
        raise TargetError(f"'@{blocks}' is not a block range: write @FIRST-LAST or @FIRST- (e.g. attention@20-)")
    return spec or None, range(int(found[1]), int(found[2]) + 1 if found[2] else 1 << 30)


def block_index(name: str) -> int | None:
    """The block a parameter belongs to: the first number in its name (`model.layers.12.…` -> 12)."""
    found = re.search(r"\.(\d+)\.", f".{name}")
    return int(found[1]) if found else None


def resolve_targets(checkpoint: Checkpoint, spec: str | None = None) -> list[Target]:
    """Match the patterns against the checkpoint's tensor names; refuse non-matrices clearly."""
    spec, blocks = block_range(spec)
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
        if blocks is not None and block_index(name) not in blocks:
            continue
        shape = checkpoint.shape(name)
        if len(shape) != 2:
            raise TargetError(
                f"target '{name}' has shape {list(shape)}: only 2-D weight matrices can be decomposed"
            )
        targets.append(Target(name, shape[0], shape[1], checkpoint.dtype(name)))
    if family is None and any(".experts." in t.name for t in targets):
        from sve_cli.architectures import architecture, experts_note

        spec_of = architecture(checkpoint)
        if spec_of.fused:  # stored as 2-D tensors per expert, loaded as one fused 3-D tensor: no layer to replace
            raise TargetError(experts_note(spec_of) + f" (e.g. '{next(t.name for t in targets if '.experts.' in t.name)}')")
    if not targets:
        where = f" in blocks {blocks.start}-{'' if blocks.stop == 1 << 30 else blocks.stop - 1}" if blocks else ""
        raise TargetError(f"the '{spec or 'all'}' preset matches no tensor{where} in {checkpoint.source}")
    return targets
