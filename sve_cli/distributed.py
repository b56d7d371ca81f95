"""Several processes under `torchrun`: data parallel (DDP) or sharded (FSDP2).

- `ddp` (the default): every rank holds the whole model; each takes an equal share of every global batch
  and DDP averages the gradients once per optimiser step.
- `fsdp`: `torch.distributed.fsdp.fully_shard` on every transformer block, then on the whole ensemble,
  so the frozen weights, the shared factors (`U`, `Vh`) and what trains (σ, biases, heads, AdamW's
  moments) are split across the ranks: per-rank memory for them falls as 1/N. Parameters are gathered
  a block at a time in the forward and backward passes; gradients are reduce-scattered once per
  optimiser step. Checkpoints and banks are gathered (`full`) and written by rank 0: the files are the
  ones a single process writes, and a gathered checkpoint resumes on any number of ranks.

Every rank must run the same collectives in the same order: inference pads the ranks' shares to the
same number of batches (`inference.predict`), and a divergence seen on one rank stops all (`any_rank`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    @property
    def writer(self) -> bool:
        return self.rank == 0


def init_parallel(parallelism: str = "ddp") -> Parallel:
    """The processes `torchrun` started (NCCL on GPUs, gloo on CPUs), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Parallel(dist.get_rank(), world, parallelism == "fsdp")


def wrap(ensemble: nn.Module, parallel: Parallel) -> nn.Module:
    """The ensemble as training runs it: itself, under DDP, or sharded by FSDP2 (in place)."""
    if parallel.world == 1:
        return ensemble
    if not parallel.fsdp:
        with warnings.catch_warnings():  # torch 2.13 deprecates it, but its successor still syncs at init
            warnings.simplefilter("ignore", FutureWarning)
            return nn.parallel.DistributedDataParallel(ensemble, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sve_cli.architectures import block_list

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (parallel.world,))
    _, blocks = block_list(ensemble.backbone)
    for block in blocks or []:
        fully_shard(block, mesh=mesh)
    fully_shard(ensemble, mesh=mesh)
    return ensemble


def for_inference(ensemble: nn.Module, parallelism: str) -> Parallel:
    """`sve evaluate` / `sve predict` under torchrun: every rank predicts a share; a run trained sharded is
    sharded again (its bank is loaded first, whole), so a model one device cannot hold is evaluated too."""
    parallel = init_parallel(parallelism)
    if parallel.fsdp and parallel.world > 1:
        wrap(ensemble, parallel)
    return parallel


@contextlib.contextmanager
def gradient_sync(model: nn.Module, parallel: Parallel, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only when `sync` (the step's last pass)."""
    if parallel.world == 1 or sync:
        yield
    elif parallel.fsdp:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def settle(model: nn.Module, parallel: Parallel) -> None:
    """Put a sharded model's parameters back into their shards (FSDP keeps the root's gathered after a
    forward pass), so the parameters seen by name are the ones the optimiser holds."""
    if parallel.fsdp and hasattr(model, "reshard"):
        model.reshard()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one; every rank must call it for a sharded tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like(parameter: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `parameter` is: this rank's shard of it when `parameter` is sharded."""
    if hasattr(parameter, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(parameter.dtype), parameter.device_mesh, parameter.placements)
    return whole


def any_rank(flag: bool, parallel: Parallel) -> bool:
    """True when `flag` is True on any rank (so that every rank stops together)."""
    if parallel.world == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def average(values: list[float], parallel: Parallel) -> list[float]:
    """The mean of each value over the ranks (what the progress line and metrics.jsonl report)."""
    if parallel.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor)
    return (tensor / parallel.world).tolist()


def barrier(parallel: Parallel) -> None:
    if parallel.world > 1:
        dist.barrier()
