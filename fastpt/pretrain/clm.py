"""Causal LM and prefix LM batches.

Causal LM: packed blocks (``fastpt.data.pack_documents``) stacked as they are; labels are the
inputs (models shift internally) except across a document boundary, and ``document_ids`` let
the model keep attention inside a document. Prefix LM (Raffel et al. 2020; UniLM): a prefix
of each sequence is attended bidirectionally and the rest causally; the loss covers the rest
only.
"""

from __future__ import annotations

import torch

from fastpt.data.datasets import _id_tensor, pad_batch, reseed_in_worker
from fastpt._checks import check_int
from fastpt.pretrain.mlm import IGNORE_INDEX


def collate_packed(blocks: list[dict]) -> dict:
    """Stack packed blocks into ``input_ids, position_ids, document_ids, labels`` (B, T).

    The labels are the inputs, except ``IGNORE_INDEX`` where a new document starts inside a
    block: the models shift labels by one, so that label would train the previous document's
    EOS (masked to its own document) to predict a token it cannot see coming. Every target left
    is predicted from its own document, and these are what the Trainer counts (``label_shift=1``).
    Blocks must all have the same length (``pack_documents`` with ``drop_last=True``)."""
    if not blocks:
        raise ValueError("cannot collate an empty batch")
    blocks = [_check_block(i, b, blocks[0]) for i, b in enumerate(blocks)]
    lengths = sorted({len(b["input_ids"]) for b in blocks})
    if len(lengths) > 1:
        raise ValueError(f"packed blocks must all have the same length (pack_documents with "
                         f"drop_last=True), got lengths {lengths}")
    batch = {k: torch.stack([b[k] for b in blocks]) for k in blocks[0]}
    labels = batch["input_ids"].clone()
    if "document_ids" in batch:  # without them a block is one stream: attention crosses documents too
        d = batch["document_ids"]
        labels[:, 1:][d[:, 1:] != d[:, :-1]] = IGNORE_INDEX
    batch["labels"] = labels
    return batch


def _check_block(i: int, block, first) -> dict:
    """Block ``i`` as 1-D integer tensors with the keys of the first block: float ids were
    stacked as they were (float labels), a 2-D block made a (B, 1, T) batch, and a missing key
    failed as a bare KeyError."""
    if not isinstance(block, dict) or "input_ids" not in block:
        raise ValueError(f"packed block {i} must be a dict with 'input_ids' (pack_documents' blocks), "
                         f"got {type(block).__name__}{' without input_ids' if isinstance(block, dict) else ''}")
    if set(block) != set(first):
        raise ValueError(f"packed block {i} has the keys {sorted(block)}, block 0 {sorted(first)}: "
                         "every block of a batch needs the same ones")
    out = {k: _id_tensor(v, f"{k} of packed block {i}") for k, v in block.items()}
    for k, v in out.items():
        if len(v) != len(out["input_ids"]):
            raise ValueError(f"{k} of packed block {i} has {len(v)} entries for {len(out['input_ids'])} input_ids")
    return out


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) prefix lengths -> (B, 1, T, T) bool mask: keys in the prefix are visible to every
    query; other keys only to queries at or after them."""
    j = torch.arange(seq_len)
    causal = j.unsqueeze(0) <= j.unsqueeze(1)  # (T, T): key j <= query i
    in_prefix = j.unsqueeze(0) < prefix_lengths.view(-1, 1)  # (B, T) over keys
    return (causal.unsqueeze(0) | in_prefix.unsqueeze(1)).unsqueeze(1)


class PrefixLMCollator:
    """Split each sequence at a random point in [1, len-1] (or at a given ``split`` per example).

    The splits come from ``generator``: reseeded per DataLoader worker (``reseed_in_worker``),
    or per batch under the ``Trainer`` (``seed_collator``), as ``MLMCollator``'s masks."""

    def __init__(self, pad_id: int, seed: int = 0):
        check_int("seed", seed)
        self.pad_id, self.seed = pad_id, seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        reseed_in_worker(self, self.seed)  # else every DataLoader worker draws the same splits
        seqs = [e["input_ids"] for e in examples]
        if any(len(s) < 2 for s in seqs):
            raise ValueError("prefix LM needs sequences of at least 2 tokens")
        ids, attention_mask = pad_batch(seqs, self.pad_id)
        lengths = torch.tensor([len(s) for s in seqs])
        for i, e in enumerate(examples):
            if "split" in e:  # a float split (2.5) was taken as it was, a bool as 0 or 1
                check_int(f"split of example {i}", e["split"])
        prefix = torch.tensor([
            e["split"] if "split" in e else
            int(torch.randint(1, len(e["input_ids"]), (1,), generator=self.generator))
            for e in examples])
        if bool(((prefix < 1) | (prefix >= lengths)).any()):
            raise ValueError("each split must lie in [1, len(input_ids) - 1]")
        T = ids.shape[1]
        labels = ids.clone()
        positions = torch.arange(T).unsqueeze(0)
        # Models shift labels by one, so position p's label is predicted from p-1: the first
        # target token (at index prefix) is predicted from the last prefix token.
        labels[(positions < prefix.unsqueeze(1)) | ~attention_mask] = IGNORE_INDEX
        # The model builds the mask from prefix_lengths (prefix_lm_mask) and attention_mask.
        return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels,
                "prefix_lengths": prefix}
