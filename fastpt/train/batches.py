"""The Trainer's batches: read and collated where they are read (in a DataLoader worker, if
any), with a collator's randomness a pure function of (seed, rank, epoch, batch index), so a
resumed run, a worker or another process draws the same masks for the same batch."""

from __future__ import annotations

import hashlib
import itertools

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

from fastpt.data.datasets import seed_collator


def collate_generator(collate_fn) -> torch.Generator | None:
    """The torch.Generator an objective's collator draws its masks from, if it has one."""
    g = getattr(collate_fn, "generator", None)
    return g if isinstance(g, torch.Generator) else None


def seed_of(*key) -> int:
    """A 64-bit seed from a tuple of ints and strings; nearby keys give unrelated seeds."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


class KeyedCollate:
    """``collate_fn`` with its randomness a pure function of ``key`` and the batch index, so a
    batch gets the same masks whichever process collates it and whatever was collated before."""

    def __init__(self, collate_fn, key: tuple):
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        own_seed = getattr(collate_fn, "seed", None)  # two collator seeds still give two mask streams
        self.key = (*key, own_seed if isinstance(own_seed, int) else None)

    def __call__(self, index: int, examples: list):
        if collate_generator(self.collate_fn) is not None:
            seed_collator(self.collate_fn, seed_of(*self.key, index))
        return self.collate_fn(examples)


def as_is(batch):
    """The loaders below yield batches already collated (where they were read)."""
    return batch


class MapBatches(Dataset):
    """Item ``t``: batch ``t`` (a list of indices into ``data``), collated."""

    def __init__(self, data, batches: list, collate: KeyedCollate):
        self.data, self.batches, self.collate = data, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, t: int):
        fetch = getattr(self.data, "__getitems__", None)  # a batched read, as DataLoader itself uses
        return self.collate(t, fetch(self.batches[t]) if fetch else [self.data[i] for i in self.batches[t]])


class IterableBatches(IterableDataset):
    """Batches of an iterable dataset, collated where they are read (in a DataLoader worker, if
    any). Batch j of worker k of n is indexed j * n + k: its place in the loader's round-robin
    order while every worker has data, and never before it. Batches indexed below ``skip`` thus
    come before the resume point and are not collated; the loader's consumer drops the first
    ``skip`` items (these placeholders, and batches that a worker running dry moved forward)."""

    def __init__(self, data, batch_size: int, drop_last: bool, skip: int, collate: KeyedCollate):
        self.data, self.batch_size, self.drop_last = data, batch_size, drop_last
        self.skip, self.collate = skip, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        examples = iter(self.data)
        for j in itertools.count():
            batch = list(itertools.islice(examples, self.batch_size))
            if not batch or (self.drop_last and len(batch) < self.batch_size):
                return
            index = j * workers + worker
            yield None if index < self.skip else self.collate(index, batch)
