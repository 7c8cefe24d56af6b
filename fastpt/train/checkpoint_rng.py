"""Every process's Python, NumPy and torch RNG states, as a checkpoint saves, checks and restores them."""

from __future__ import annotations

import random

import numpy as np
import torch

from fastpt.models.hf import CheckpointError
from fastpt.train.checkpoint_checks import OPTIM_FILE, _few


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing the Python, NumPy and torch generators."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_keys.astype(np.int64))}
    meta = {"python": [version, list(state), gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos,
                         np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])


def _rng_names(rank: int) -> tuple[str, str]:
    """The names of process ``rank``'s torch and NumPy RNG tensors in the optimizer file."""
    prefix = "rng." if rank == 0 else f"rng.{rank}."
    return prefix + "torch", prefix + "numpy"


def _check_rng(tensors: dict, meta: dict, file: str, rank: int = 0) -> None:
    """Raise CheckpointError unless the saved RNG states can be restored. They are tried on
    private generators, so a bad state leaves the process's own generators untouched."""
    try:
        version, state, gauss = meta["python"]
        random.Random().setstate((version, tuple(state), gauss))
        np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
        np.random.RandomState().set_state((np_name, tensors["rng.numpy"].numpy().astype(np.uint32),
                                           np_pos, np_has_gauss, np_gauss))
        torch.Generator().set_state(tensors["rng.torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        torch_name, numpy_name = _rng_names(rank)
        field = "rng" if rank == 0 else f"rng.other_ranks[{rank - 1}]"
        where = f"field {field!r} and the tensors {torch_name}, {numpy_name}"
        raise CheckpointError(f"{file}: the RNG state of process {rank} ({where} of {OPTIM_FILE}) "
                              f"cannot be restored ({type(e).__name__}: {e})") from None


def _rng_ranks(tensors: dict, meta: dict, file: str) -> list[tuple[dict, dict]]:
    """Every saved process's RNG state, in rank order, as ``rng_state()`` gave it; each one
    checked to be restorable."""
    metas = [meta, *meta.get("other_ranks", [])]
    expected = [name for rank in range(len(metas)) for name in _rng_names(rank)]
    if sorted(tensors) != sorted(expected):
        raise CheckpointError(f"{file}: the RNG state (field 'rng' and the rng.* tensors of {OPTIM_FILE}) "
                              f"cannot be restored: field 'rng' holds the states of {len(metas)} processes, "
                              f"whose tensors are {_few(expected)}, and {OPTIM_FILE} holds "
                              f"{_few(sorted(tensors))}")
    ranks = []
    for rank, own in enumerate(metas):
        torch_name, numpy_name = _rng_names(rank)
        own_tensors = {"rng.torch": tensors[torch_name], "rng.numpy": tensors[numpy_name]}
        _check_rng(own_tensors, own, file, rank)
        ranks.append((own_tensors, {"python": own["python"], "numpy": own["numpy"]}))
    return ranks


def rng_processes(state: dict) -> int | None:
    """How many processes' RNG states a loaded checkpoint holds; None for one written before
    fastpt saved every process's (it holds process 0's alone, whatever the number of processes)."""
    return len(state["rng_ranks"]) if "other_ranks" in state["rng"] else None


def restore_rng(state: dict, rank: int = 0) -> None:
    """Set this process's Python, NumPy and torch generators to the states process ``rank``
    of the saved run had."""
    set_rng_state(*state["rng_ranks"][rank])
