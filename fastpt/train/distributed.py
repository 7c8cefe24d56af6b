"""torch.distributed setup for the Trainer: one process per rank, launched by ``torchrun``.

gloo on CPU, NCCL on GPU. ``torchrun`` sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
without them everything runs in one process and no process group is created.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """Join the process group that torchrun describes (if any); returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, world: int) -> torch.nn.Module:
    """DDP or FSDP (per-layer ``fully_shard``) for ``world > 1``; the model itself otherwise."""
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" or world == 1:
        return model
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)
    return model
