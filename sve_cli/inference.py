"""Batched inference over an encoded split: every member's logits `[N, M, C]`.

Shared by training (validation), evaluation and prediction. Under torchrun each rank predicts a
strided share and the shares are gathered; every rank runs the same number of batches (the short ones
repeat a row and drop it), as a sharded model's collectives need. `members_per_pass` runs the members in
chunks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from sve_cli.pipeline import Encoded
from sve_cli.distributed import Parallel
from sve_cli.ensemble import SVEModel


def member_chunks(members: int, per_pass: int | None) -> list[tuple[int, int]]:
    """`[(start, stop), …]`: the members run together in one pass (`train.members_per_pass`)."""
    size = per_pass or members
    return [(start, min(start + size, members)) for start in range(0, members, size)]


def cache_budget(spec: str, device: torch.device) -> int:
    """The eval weight cache's budget in bytes: "auto" is a quarter of the free memory of `device` (GPU) or of
    the RAM available; "0" turns the cache off; otherwise a size ("4GB")."""
    from sve_cli.writing import parse_size

    if spec != "auto":
        return parse_size(spec)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")) // 4
    except (OSError, StopIteration):
        return 0


@torch.no_grad()
def predict(model: SVEModel, data: Encoded, batch_size: int, parallel: Parallel = Parallel(),
            on_batch: Callable[[int], None] | None = None, members_per_pass: int | None = None,
            budget: str = "auto") -> torch.Tensor:
    """Logits `[N, M, C]` of every example; under torchrun each rank does a strided share. Members' dense
    weights are cached for the pass only while all of them fit `budget` (`cache_budget`; never when the
    model is sharded, which would undo the sharding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model.fit_eval_cache(0 if parallel.fsdp else cache_budget(budget, device))
    rows = torch.arange(parallel.rank, len(data), parallel.world)
    batches = math.ceil(math.ceil(len(data) / parallel.world) / batch_size) if len(data) else 0  # the same on every rank
    outputs = []
    for start in range(0, batches * batch_size, batch_size):
        indices = rows[start:start + batch_size]
        padding = indices.numel() == 0  # this rank's share ran out: a row to keep the collectives in step
        batch = {k: v.to(device) for k, v in data.batch(indices if not padding else torch.tensor([0])).items()}
        chunks = []
        for first, stop in member_chunks(model.members, members_per_pass):
            with model.active_members(first, stop):
                chunks.append(model(**batch).float().cpu())  # [b, m, C]
        if not padding:
            outputs.append(torch.cat(chunks, dim=1))  # [b, M, C]
            on_batch and on_batch(len(indices))
    model.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0)
    if parallel.world == 1:
        return logits
    gathered = [None] * parallel.world
    dist.all_gather_object(gathered, logits)
    shape = next(part.shape[1:] for part in gathered if part.numel())
    merged = torch.empty(len(data), *shape)
    for rank, part in enumerate(gathered):
        if part.numel():
            merged[rank::parallel.world] = part
    return merged
