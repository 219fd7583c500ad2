"""Data parallelism with torch.distributed: set-up (gloo on CPU, nccl on GPU), sharding and reductions.

``torchrun --nproc-per-node N -m entroclip train CONFIG`` sets the environment this module reads. Each
rank samples its share of the prompts, DDP all-reduces the gradients, and every metric is reduced over
the global batch (token-weighted sums, not averages of rank averages) before rank 0 logs it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (len must be divisible by the world size)."""
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} items cannot be split evenly over {self.world_size} ranks")
        per_rank = len(items) // self.world_size
        return list(items[self.rank * per_rank : (self.rank + 1) * per_rank])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def min(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MIN)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp) -> list[float]:
        if not self.enabled:
            return list(values)
        buffer = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(buffer, op=op)
        return buffer.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank."""
        if not self.enabled:
            return flag
        buffer = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(buffer, src=0)
        return bool(buffer.item())


def init_distributed() -> DistContext:
    """Join the process group described by torchrun's environment; a single process without it.

    The backend is nccl when CUDA is available, gloo otherwise; the device is ``cuda:LOCAL_RANK`` or CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if world_size == 1:
        return DistContext(device=device)
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def global_loss_factor(mask: Tensor, agg: str, ctx: DistContext) -> float:
    """Factor that turns a rank's locally aggregated loss into its share of the global aggregate.

    DDP averages gradients over ranks, so a rank's loss must be (its sum) / (global normaliser) * world
    size: the local loss times (local count * world / global count), where the count is the number of
    valid tokens (token-mean) or of non-empty sequences (the seq-mean modes). 1 without distribution.
    """
    if not ctx.enabled:
        return 1.0
    valid = mask.bool()
    local = float(valid.sum()) if agg == "token-mean" else float(valid.any(-1).sum())
    (total,) = ctx.sum([local])
    return local * ctx.world_size / total if total else 0.0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
