"""Members share what they share: the blocks below the first targeted layer run once per batch.

Every member of an ensemble computes the same activations until the first layer that differs between
members (the first target). `SharedPrefix` lets the backbone run on the batch's `B` rows and fans out to
the members' `M·B` rows (member-major, as `SVEModel` lays them out) at the entrance of the first block
that holds a target: a forward pre-hook on that block and on every block after it repeats each tensor
argument that has the batch's rows (the hidden states on the first, the attention mask and the rotary
tables, computed once by the model before its block loop, on all of them). Exact — the same arithmetic,
done once instead of M times — and it also saves the memory of M copies of the prefix's activations.

It applies only to the families in sve's registry (each tested exact, tests/test_prefix.py: an inferred
family may fold the batch into another axis, as BLOOM's ALiBi tensor `[B·heads, 1, T]` does), when every
target lives inside the model's one list of blocks (not an encoder–decoder's second stack, not an
embedding projection), and when the members share their inputs (`member_major=False`): inputs that
differ per member (`train.member_batches: shuffled`) have no shared prefix.
"""

from __future__ import annotations

import torch
from torch import nn


class SharedPrefix:
    """Pre-hooks on `blocks[first:]` that fan out the batch to the members (see the module docstring).

    `set(rows, members)` before each forward: `rows` is the shared batch's size, None when the inputs
    are already member-major. The setting stays in force after the forward, so that a block recomputed
    in the backward pass (gradient checkpointing) fans out exactly as it did going forward.
    """

    def __init__(self, blocks: nn.ModuleList, first: int):
        self.first = first
        self.rows: int | None = None
        self.members = 1
        self.enabled = True
        self._handles = [block.register_forward_pre_hook(self._fan_out, with_kwargs=True)
                         for block in list(blocks)[first:]]

    def set(self, rows: int | None, members: int) -> None:
        self.rows, self.members = rows, members

    @property
    def active(self) -> bool:
        """Whether the next forward runs the prefix once (the backbone then takes the shared `B` rows)."""
        return self.enabled and self.rows is not None and self.members > 1

    def _fan_out(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active:
            return None
        return tuple(self._repeat(value) for value in args), {key: self._repeat(value) for key, value in kwargs.items()}

    def _repeat(self, value):
        """`[B, …]` -> `[M·B, …]` member-major; tensors of other sizes (already fanned out, or not batched:
        `cache_position [T]`, a broadcast `[1, …]` when B > 1) and non-tensors pass unchanged."""
        if isinstance(value, tuple):  # e.g. rotary (cos, sin)
            return tuple(self._repeat(item) for item in value)
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == self.rows:
            return value.repeat(self.members, *[1] * (value.dim() - 1))
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def shared_prefix(backbone: nn.Module, layers: dict[str, nn.Module]) -> SharedPrefix | None:
    """A `SharedPrefix` for `backbone` whose member layers are `layers`, or None when some layer lies
    outside the backbone's block list (then every block runs on the members' rows)."""
    from sve_cli.architectures import block_list

    if not layers:
        return None
    name, blocks = block_list(backbone)
    if blocks is None:
        return None
    names = {id(module): module_name for module_name, module in backbone.named_modules()}
    indices = []
    for layer in layers.values():
        module_name = names.get(id(layer), "")
        if not module_name.startswith(f"{name}."):
            return None
        index = module_name[len(name) + 1:].split(".", 1)[0]
        if not index.isdigit():
            return None
        indices.append(int(index))
    return SharedPrefix(blocks, min(indices))
