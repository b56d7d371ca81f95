"""What a step trains on and how fast: the learning-rate schedule, AdamW's parameter groups, and the
order each member sees the training data in (`train.member_batches`)."""

from __future__ import annotations

import math

import torch

from sve_cli.ensemble import SVEModel
from sve_cli.recipe import Recipe


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)


def param_groups(model: SVEModel, recipe: Recipe) -> list[dict]:
    """AdamW groups: sigma (`sigma_lr`, `sigma_weight_decay`), heads (`head_lr`), the rest (`lr`)."""
    train = recipe.train
    trainable = model.trainable_parameters()
    sigma = [p for name, p in trainable.items() if name.endswith(".sigma")]
    heads = [p for name, p in trainable.items() if name.startswith("head.")]
    other = [p for name, p in trainable.items() if not name.endswith(".sigma") and not name.startswith("head.")]
    sigma_decay = train.weight_decay if train.sigma_weight_decay is None else train.sigma_weight_decay
    groups = [("other", other, train.lr, train.weight_decay), ("heads", heads, train.head_lr or train.lr, train.weight_decay),
              ("sigma", sigma, train.sigma_lr or train.lr, sigma_decay)]
    return [{"params": params, "lr": lr, "weight_decay": decay, "base_lr": lr, "name": name}
            for name, params, lr, decay in groups if params]


class MemberOrders:
    """The order each member sees the training data in, epoch by epoch (`train.member_batches`).

    shared: one seeded permutation per epoch for every member (the default, as before);
    shuffled: each member its own permutation; bootstrap: each member its own draw of N rows
    with replacement. All are seeded by (seed, epoch, member), so a resumed run sees the same
    batches; the step costs the same as with shared batches (the `[M·B]` batch exists anyway).
    """

    def __init__(self, rows: int, members: int, seed: int, mode: str):
        self.rows, self.seed, self.mode = rows, seed, mode
        self.members = 1 if mode == "shared" else members
        self._epoch, self._orders = -1, []

    def _order(self, epoch: int, member: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + member * 1_000_003)
        if self.mode == "bootstrap":
            return torch.randint(self.rows, (self.rows,), generator=generator)
        return torch.randperm(self.rows, generator=generator)

    def batch(self, epoch: int, offset: int, size: int) -> list[torch.Tensor]:
        """Rows of batch `offset` of `epoch`, one tensor per member (one in all for shared)."""
        if epoch != self._epoch:
            self._epoch, self._orders = epoch, [self._order(epoch, m) for m in range(self.members)]
        return [order[offset * size:(offset + 1) * size] for order in self._orders]
