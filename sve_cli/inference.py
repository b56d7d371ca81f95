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


def target_sums(model: SVEModel, batch: dict[str, torch.Tensor], members_per_pass: int | None = None) -> torch.Tensor:
    """A generation ensemble's scores of each row's target tokens, summed over them: `[b, M + 3]` = each
    member's log-likelihood, the members' mean distribution's log-likelihood, its correct tokens (argmax =
    target), and the row's target tokens. The mean distribution is accumulated member chunk by chunk."""
    target_ids = batch["target_ids"]  # [b, T]
    selected = target_ids != -100
    targets = target_ids[selected]  # [N]
    member_log_likelihood, probability_sum = [], None
    for first, stop in member_chunks(model.members, members_per_pass):
        with model.active_members(first, stop):
            log_probs = model(**batch).double().log_softmax(-1)  # [N, m, V]
        member_log_likelihood.append(log_probs.gather(-1, targets[:, None, None].expand(-1, stop - first, 1))[..., 0])
        chunk_sum = log_probs.exp().sum(1)  # [N, V]
        probability_sum = chunk_sum if probability_sum is None else probability_sum + chunk_sum
    mixture = probability_sum / model.members  # [N, V]
    per_token = torch.cat([torch.cat(member_log_likelihood, dim=1),  # [N, M]
                           mixture.gather(-1, targets[:, None]).log(),  # [N, 1]
                           (mixture.argmax(-1) == targets).double()[:, None],
                           torch.ones_like(targets, dtype=torch.float64)[:, None]], dim=1)  # [N, M + 3]
    row_of_token = selected.nonzero()[:, 0]  # [N]
    sums = torch.zeros(target_ids.shape[0], per_token.shape[1], dtype=torch.float64)
    return sums.index_add_(0, row_of_token.cpu(), per_token.cpu())  # [b, M + 3]


@torch.no_grad()
def predict(model: SVEModel, data: Encoded, batch_size: int, parallel: Parallel = Parallel(),
            on_batch: Callable[[int], None] | None = None, members_per_pass: int | None = None,
            budget: str = "auto") -> torch.Tensor:
    """Logits `[N, M, C]` of every example (a generation ensemble: `target_sums`, `[N, M + 3]`); under
    torchrun each rank does a strided share. Members' dense
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
        if model.head_kind == "tokens":
            scored = target_sums(model, batch, members_per_pass)  # [b, M + 3]
        else:
            chunks = []
            for first, stop in member_chunks(model.members, members_per_pass):
                with model.active_members(first, stop):
                    chunks.append(model(**batch).float().cpu())  # [b, m, C]
            scored = torch.cat(chunks, dim=1)  # [b, M, C]
        if not padding:
            outputs.append(scored)
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
