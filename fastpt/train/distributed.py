"""torch.distributed setup for the Trainer: one process per rank, launched by ``torchrun``.

gloo on CPU, NCCL on GPU (each process on the GPU of its LOCAL_RANK). ``torchrun`` sets RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them everything runs in one
process and no process group is created.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist


def _env_int(name: str, default: str) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:  # int()'s message names neither the variable nor where it came from
        raise ValueError(f"the environment variable {name} must be an integer (as torchrun sets it), "
                         f"got {os.environ[name]!r}") from None


def resolve_device(name: str, model: torch.nn.Module) -> torch.device:
    """The device this process trains on: ``"cpu"``; ``"cuda"``, the GPU of LOCAL_RANK (made
    the current one, as NCCL needs); ``"auto"``, where ``model`` is: cuda (LOCAL_RANK's GPU)
    for a model on a GPU, else cpu. (Not the GPU for any model on a GPU host: fastpt's commands
    evaluate their CPU models after training.)"""
    on_gpu = any(t.is_cuda for t in itertools.chain(model.parameters(), model.buffers()))
    if name == "cpu" or (name == "auto" and not on_gpu):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("TrainerConfig.device is 'cuda', but torch.cuda.is_available() is False "
                         "(a CPU build of torch, or no GPU visible): use device 'auto' or 'cpu'")
    index = _env_int("LOCAL_RANK", "0")
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {index} has no GPU: this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_from_env(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group that torchrun describes (if any), NCCL for a CUDA ``device`` and
    gloo otherwise; returns (rank, world_size)."""
    world = _env_int("WORLD_SIZE", "1")
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on ``value``'s device (NCCL reduces it on this process's GPU)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        nccl = dist.get_backend() == "nccl"
        work = value.to(torch.device("cuda", torch.cuda.current_device()) if nccl else value.device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        value = work.to(value.device)
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
               find_unused_parameters: bool = False, device: torch.device | None = None) -> torch.nn.Module:
    """DDP or FSDP (per-layer ``fully_shard``) for ``world > 1``; the model itself otherwise.

    ``find_unused_parameters`` is DDP's: needed when some parameters get no gradient (ELECTRA's
    unused heads). FSDP needs no such flag: it reduces only the gradients that exist."""
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "single"
    if strategy == "single" or world == 1:
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                         find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                fully_shard(layer)
    fully_shard(model)
    return model
