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
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # int()'s message names neither the variable nor where it came from
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer (the number of "
                         f"processes, as torchrun sets it), got {os.environ['WORLD_SIZE']!r}") from None
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


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (pickled through the process group, so for
    small objects only), None on the other ranks; ``[obj]`` without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, everyone, dst=0)
    return everyone


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, world: int, *,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DDP or FSDP (per-layer ``fully_shard``) for ``world > 1``; the model itself otherwise.

    ``find_unused_parameters`` is DDP's: needed when some parameters get no gradient (ELECTRA's
    unused heads). FSDP needs no such flag: it reduces only the gradients that exist."""
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" or world == 1:
        return model
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)
    return model
