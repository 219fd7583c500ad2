"""Data parallelism with torch.distributed: set-up (gloo on CPU, nccl on GPU), sharding and reductions.

``torchrun --nproc-per-node N -m entroclip train CONFIG`` sets the environment this module reads. Each
rank samples its share of the prompts, DDP all-reduces the gradients (or FSDP2 reduce-scatters them to
the rank that holds each parameter shard), and every metric is reduced over the global batch
(token-weighted sums, not averages of rank averages) before rank 0 logs it. Checkpoints always hold the
whole (unsharded) weights and optimizer state, so a run resumes at any number of ranks in either mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.modules.module import _IncompatibleKeys

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

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp.RedOpType) -> list[float]:
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

    DDP and FSDP average gradients over ranks, so a rank's loss must be (its sum) / (global normaliser)
    * world size: the local loss times (local count * world / global count), where the count is the
    number of valid tokens (token-mean) or of non-empty sequences (the seq-mean modes). 1 without
    distribution.
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


def shard_module(module: nn.Module, ctx: DistContext) -> None:
    """Shard ``module``'s parameters over all ranks in place with FSDP2 (``fully_shard``).

    Each block (a submodule whose class is in the Hugging Face ``_no_split_modules`` list, i.e. a decoder
    layer) is sharded on its own, bottom-up, and the root takes the rest (embeddings, final norm, head).
    A forward pass all-gathers one block at a time, so every rank must run the same forward passes.
    bfloat16 parameters compute in bfloat16 and reduce their gradients in float32.
    """
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy()
    if any(p.dtype == torch.bfloat16 for p in module.parameters()):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    for block in reversed(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP2, so that its forward pass is a collective."""
    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s whole state dict: gathered from the shards onto rank 0's CPU when sharded (the other
    ranks, which must call it too, get an empty dict). Tied parameters stay one tensor."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # a full, offloaded model state dict holds plain tensors (no DTensor shards, no nested state)
    state = cast(dict[str, Tensor], get_model_state_dict(module, options=options))
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        original = first.setdefault(id(param), name)
        if original != name and original in state:
            state[name] = state[original]
    return state


def load_full_state_dict(
    module: nn.Module, weights: Mapping[str, Tensor], *, strict: bool
) -> _IncompatibleKeys:
    """Load a whole state dict (every rank passes the same) into ``module``, sharded or not."""
    options = StateDictOptions(full_state_dict=True, strict=strict)
    return set_model_state_dict(module, dict(weights), options=options)


def full_optimizer_state(optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """``optimizer.state_dict()`` whole on rank 0, with the moments of sharded parameters gathered onto
    its CPU; every rank must call it, and the other ranks get an empty dict."""
    state = optimizer.state_dict()
    gathered = {
        index: {key: _gathered(value, ctx.is_main) for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return {**state, "state": gathered} if ctx.is_main else {}


def _gathered(value: Any, keep: bool) -> Any:
    """A DTensor gathered whole (a collective), on the CPU if ``keep`` (else None); anything else as is."""
    if not isinstance(value, DTensor):
        return value
    whole = value.full_tensor()
    return whole.cpu() if keep else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state dict (``full_optimizer_state``); the moments of sharded parameters
    are sharded like them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {
        index: {key: _sharded_like(value, params[index]) for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": sharded})


def _sharded_like(value: Any, param: Tensor) -> Any:
    if isinstance(param, DTensor) and isinstance(value, Tensor) and value.shape == param.shape:
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value


def place(module: nn.Module, ctx: DistContext, sharded: bool) -> None:
    """Move ``module`` to this rank's device, or shard it over the ranks (``run.parallel: fsdp``)."""
    if sharded:
        shard_module(module, ctx)
    else:
        module.to(ctx.device)


def data_parallel(module: nn.Module, ctx: DistContext, sharded: bool) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when there are several ranks (unless sharded)."""
    if not ctx.enabled or sharded:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
