"""Member-batched baselines with the same interface as `SVELinear`, so every method shares the
model wrapping, data and training loop (fair comparisons):

- `DenseMembersLinear`: each member owns a full copy of `W` and `b` — `single` (M = 1) and
  `deep_ensemble` (M copies) with `single_mode: full`. Deep-ensemble members start at
  `W ⊙ (1 + ε_m)`, `ε_m ~ N(0, σ_init²)`, the jitter SVE puts on `S`: with shared batches and no
  dropout (LLaMA) or a head copied into every member (letter heads), exact copies would receive
  identical gradients and stay one model.
- `LoRAMembersLinear`: frozen `W`, each member owns a rank-r adapter `B_m A_m` (`lora_ensemble`).
  peft's `LoraLayer` holds one active adapter per forward; batching M adapters in one pass needs
  the member-major view used here, so the LoRA maths is written out (same init as peft: A
  Kaiming-uniform, B zero, scale alpha / r).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sve_cli.layer import MemberSlice, jittered_copies


class _MemberLinear(MemberSlice):
    """`[m·B, …, in]` -> `[m, B·T, in]` -> `[m·B, …, out]` for the `active` members."""

    in_features: int
    out_features: int

    def _unrows(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out.reshape(*x.shape[:-1], self.out_features)


class DenseMembersLinear(_MemberLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, members: int, jitter: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(members)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(jittered_copies(weight, members, jitter, generator))  # [M, out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone()[None].repeat(members, 1))  # [M, out]

    def member_weight(self, member: int) -> torch.Tensor:
        return self.weight[member]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, weight, bias = self.member_rows(x), self.chunk(self.weight), self.chunk(self.bias)
        if bias is None:
            return self._unrows(torch.bmm(rows, weight.transpose(1, 2)), x)
        return self._unrows(torch.baddbmm(bias[:, None, :], rows, weight.transpose(1, 2)), x)


def lora_merged(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """`W + scale · B A` (peft's merge): `[out, in]` from `A [r, in]`, `B [out, r]`."""
    return weight + scale * lora_B @ lora_A


class LoRAMembersLinear(_MemberLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, members: int, rank: int,
                 alpha: float, generator: torch.Generator):
        super().__init__(members)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # [out, in], frozen (FSDP shards it)
        self.base_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
        lora_a = (torch.rand(members, rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(lora_a)  # [M, r, in]
        self.lora_B = nn.Parameter(torch.zeros(members, self.out_features, rank))  # [M, out, r]
        self.scale = alpha / rank

    def member_weight(self, member: int) -> torch.Tensor:
        return lora_merged(self.weight, self.lora_A[member], self.lora_B[member], self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.member_rows(x)  # [m, B·T, in]
        out = rows @ self.weight.T  # [m, B·T, out]
        if self.base_bias is not None:
            out = out + self.base_bias
        lora_a, lora_b = self.chunk(self.lora_A), self.chunk(self.lora_B)
        update = (rows @ lora_a.transpose(1, 2)) @ lora_b.transpose(1, 2)  # [m, B·T, out]
        return self._unrows(out + self.scale * update, x)
