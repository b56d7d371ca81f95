"""`SVELinear`: one frozen `W = U diag(S) Vh`, M members that own only their singular values.

Member m computes `y_m = U (s_m ⊙ (Vh x)) + bias_m`; its singular values `s_m` come from the
trained tensor `sigma_m` by one of three parameterisations (`singular_values`):

- relative: `s_m = S ⊙ relu(1 + sigma_m)`, sigma initialised at `σ_init·ε`: an optimiser step moves
            every singular value by the same *relative* amount whatever its size, and weight decay
            pulls towards the pretrained spectrum;
- clamp:    `s_m = relu(sigma_m)`, sigma initialised at `S ⊙ (1 + σ_init·ε)` (the paper's code);
- softplus: `s_m = softplus(sigma_m)`, the same initialisation through softplus's inverse.

Inputs arrive member-major as `[M·B, …, in]` and are viewed as `[M, B·T, in]`. Two exact
strategies (docs/design.md):

- factored:      `((x Vh^T) ⊙ s) U^T`           k·(in+out) per token, no per-member weight
- materialised:  `W_m = (U ⊙ s_m) Vh`, `x W_m^T`  M·out·in·k per call + out·in per token

`auto` picks the cheaper one per call from that cost model; in eval mode a materialised `W_m`
is cached and rebuilt only when sigma or bias change (their in-place version counters move).
`active` (a range of members, set by `SVEModel.active_members`) runs a chunk of the members only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRATEGIES = ("auto", "factored", "materialised")
PARAMETERISATIONS = ("relative", "clamp", "softplus")


def singular_values(sigma: torch.Tensor, base: torch.Tensor, parameterisation: str) -> torch.Tensor:
    """The non-negative singular values members use, `[…, k]`, from their trained `sigma [.., k]`
    and the pretrained singular values `base [k]` (see the module docstring)."""
    if parameterisation == "relative":
        return base * F.relu(1 + sigma)
    return F.relu(sigma) if parameterisation == "clamp" else F.softplus(sigma)


def initial_sigma(base: torch.Tensor, noise: torch.Tensor, parameterisation: str) -> torch.Tensor:
    """Trained values `[M, k]` whose singular values are `base ⊙ (1 + noise)` (`noise [M, k]`)."""
    if parameterisation == "relative":
        return noise
    values = base[None, :] * (1 + noise)
    return inverse_softplus(values) if parameterisation == "softplus" else values


def merged_weight(U: torch.Tensor, values: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """`U diag(values) Vh`: `[out, in]` for `values [k]`, `[m, out, in]` for `values [m, k]`."""
    if values.dim() == 1:
        return (U * values.to(U.dtype)) @ Vh
    return (U[None] * values[:, None, :].to(U.dtype)) @ Vh


def inverse_softplus(values: torch.Tensor) -> torch.Tensor:
    """x such that softplus(x) = values (values > 0; tiny values are floored at 1e-12)."""
    values = values.clamp_min(1e-12)
    return values + torch.log(-torch.expm1(-values))


def strategy_costs(members: int, tokens: int, out_features: int, in_features: int, rank: int,
                   training: bool, weights_cached: bool = False) -> dict[str, float]:
    """Multiply-adds of each strategy for one call (backward counted as twice the forward).

    `tokens` is rows per member (B·T). Building W_m costs M·out·in·k; applying it M·N·out·in;
    the factored path M·N·k·(in+out). In eval with a cached W_m the build is free.
    """
    factored = members * tokens * rank * (in_features + out_features)
    build = 0 if weights_cached else members * out_features * in_features * rank
    materialised = build + members * tokens * out_features * in_features
    passes = 3 if training else 1
    return {"factored": passes * factored, "materialised": passes * materialised}


def jittered_copies(tensor: torch.Tensor, members: int, jitter: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """`members` copies of `tensor` (`[M, *shape]`), each element times `1 + ε`, `ε ~ N(0, jitter²)`;
    exact copies (and no random draw) when `jitter` is 0."""
    copies = tensor.detach().clone()[None].repeat(members, *[1] * tensor.dim())  # [M, *shape]
    if jitter:
        copies *= 1 + jitter * torch.randn(copies.shape, generator=generator)
    return copies


class MemberSlice(nn.Module):
    """Holds M members' tensors `[M, …]`; a forward pass runs the `active` range of them
    (`SVEModel.active_members`), on inputs that arrive member-major (`[m·B, …]`)."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members
        self.active = range(members)

    def chunk(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The active members' slice of a per-member tensor `[M, …]`."""
        return None if tensor is None else tensor[self.active.start:self.active.stop]

    def member_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`[m·B, …, d]` -> `[m, B·…, d]`: each active member's rows."""
        members = len(self.active)
        if x.shape[0] % members:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of {members} members")
        return x.reshape(members, -1, x.shape[-1])


class SVELinear(MemberSlice):
    """Replaces an `nn.Linear`: shared frozen `U [out,k]`, `Vh [k,in]`; per-member `sigma [M,k]`
    and `bias [M,out]` (None when `bias=False`)."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, members: int,
                 base_bias: torch.Tensor | None = None, bias: bool = True, sigma_init: float = 0.01,
                 parameterisation: str = "clamp", strategy: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__(members)
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        self.parameterisation, self.strategy = parameterisation, strategy
        self.out_features, self.in_features = U.shape[0], Vh.shape[1]
        # frozen parameters rather than buffers, so FSDP shards them like the backbone's weights
        self.U = nn.Parameter(U.detach().clone(), requires_grad=False)  # [out, k]
        self.Vh = nn.Parameter(Vh.detach().clone(), requires_grad=False)  # [k, in]
        self.register_buffer("S", S.detach().clone(), persistent=False)  # [k], pretrained
        noise = torch.randn(members, S.shape[0], generator=generator, dtype=S.dtype) * sigma_init  # [M, k]
        self.sigma = nn.Parameter(initial_sigma(S, noise, parameterisation).to(U.dtype))
        if bias:
            base = base_bias if base_bias is not None else torch.zeros(self.out_features, dtype=U.dtype)
            noise = torch.randn(members, self.out_features, generator=generator, dtype=base.dtype) * sigma_init
            self.bias = nn.Parameter((base[None, :] + noise).to(U.dtype))  # [M, out]
        else:
            self.register_parameter("bias", None)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self.cache_weights = True  # False: never keep the [M, out, in] weights between eval calls (memory)
        self.eval_factored = False  # True: in eval, the factored path only (the weights would not fit a budget)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def singular_values(self) -> torch.Tensor:
        """The non-negative singular values each member uses, `[M, k]`."""
        return singular_values(self.sigma, self.S.to(self.sigma.dtype), self.parameterisation)

    def _active_values(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Singular values `[m, k]` and biases `[m, out]` of the active members."""
        return (singular_values(self.chunk(self.sigma), self.S.to(self.sigma.dtype), self.parameterisation),
                self.chunk(self.bias))

    def member_weight(self, member: int) -> torch.Tensor:
        """`U diag(s_m) Vh`, `[out, in]`: member m's dense weight (for export and tests)."""
        return merged_weight(self.U, self.singular_values()[member], self.Vh)

    def choose(self, tokens: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        if self.eval_factored and not self.training:
            return "factored"
        cached = (not self.training and self.cache_weights and self._cache is not None
                  and self._cache[0] == self._cache_key())
        costs = strategy_costs(len(self.active), tokens, self.out_features, self.in_features, self.rank,
                               training=self.training and self.sigma.requires_grad, weights_cached=cached)
        return min(costs, key=costs.get)

    def _cache_key(self) -> tuple:
        bias_version = self.bias._version if self.bias is not None else None
        return (self.sigma._version, self.sigma.data_ptr(), bias_version, self.U.data_ptr())

    def _weights(self, values: torch.Tensor) -> torch.Tensor:
        """`[m, out, in]` of the active members (`values` = their singular values), cached for all
        members in eval mode until sigma changes."""
        if self.training or torch.is_grad_enabled() or not self.cache_weights:
            return merged_weight(self.U, values, self.Vh)  # [m, out, in]
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, merged_weight(self.U, self.singular_values(), self.Vh))  # [M, out, in]
        return self.chunk(self._cache[1])

    def train(self, mode: bool = True) -> "SVELinear":
        self._cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = self.member_rows(x)  # [m, B·T, in]
        values, bias = self._active_values()  # [m, k], [m, out]
        if self.choose(rows.shape[1]) == "factored":
            hidden = rows @ self.Vh.T  # [m, B·T, k]
            hidden = hidden * values[:, None, :]  # [m, B·T, k]
            out = hidden @ self.U.T  # [m, B·T, out]
            if bias is not None:
                out = out + bias[:, None, :]
        elif bias is not None:
            out = torch.baddbmm(bias[:, None, :], rows, self._weights(values).transpose(1, 2))  # [m, B·T, out]
        else:
            out = torch.bmm(rows, self._weights(values).transpose(1, 2))  # [m, B·T, out]
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, k={self.rank}, members={self.members}, "
                f"{self.parameterisation}, strategy={self.strategy}")

