"""The seeds of the global RNGs (Python, NumPy, torch): one per rank, from the run's seed."""

from __future__ import annotations

import random

import numpy as np
import torch

from fastpt.train.batches import seed_of


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s own seed (its global RNGs during training, its DataLoader workers):
    ``seed`` on rank 0, as in one process; a 64-bit hash of (seed, rank) on the others. Not
    ``seed + rank``: rank 1 of the run with seed 0 would draw the dropout masks of rank 0 with
    seed 1."""
    return seed if rank == 0 else seed_of(seed, "global-rng", rank)
