"""Masked language modelling (BERT; RoBERTa's dynamic masking; whole-word masking).

Each non-special, non-padding position is selected with probability ``mlm_probability``
(0.15); a selected position becomes [MASK] with p = 0.8, a random non-special token with
p = 0.1, and stays unchanged with p = 0.1. Labels are the original ids at selected positions
and -100 elsewhere. Masks are drawn when a batch is collated, from the collator's own
``torch.Generator``, so every epoch sees new masks (dynamic masking) and a seed reproduces them.
"""

from __future__ import annotations

import torch

from fastpt.data.datasets import pad_batch
from fastpt.models.common import check_ids

IGNORE_INDEX = -100


class MLMCollator:
    """Collate ``{"input_ids", ["token_type_ids"], ["word_ids"]}`` examples into an MLM batch.

    ``special_ids``: every id that must never be masked or drawn as a random replacement.
    ``whole_word=True`` needs ``word_ids`` per example (the tokenizer's ``Encoding.word_ids``,
    None for special tokens): words are selected with ``mlm_probability`` and all their pieces
    are masked together, each piece replaced 80/10/10 independently as in HF's collator.
    """

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, special_ids, *,
                 mlm_probability: float = 0.15, whole_word: bool = False, seed: int = 0,
                 pad_to_multiple_of: int | None = None):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        special = sorted(set(special_ids) | {mask_id, pad_id})
        if any(not 0 <= i < vocab_size for i in special):
            raise ValueError(f"special ids {special} must lie in [0, vocab_size={vocab_size})")
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.mlm_probability, self.whole_word = mlm_probability, whole_word
        self.pad_to_multiple_of = pad_to_multiple_of
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[special] = True
        self.is_special = is_special
        self.replacement_ids = (~is_special).nonzero().squeeze(1)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_id,
                                        self.pad_to_multiple_of)
        check_ids("token ids", ids, self.vocab_size, "vocab_size")
        batch = {"input_ids": ids, "attention_mask": attention_mask}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"], _ = pad_batch([e["token_type_ids"] for e in examples], 0,
                                                   self.pad_to_multiple_of)
        if "next_sentence_label" in examples[0]:  # MLM + NSP batches (BERT pre-training)
            batch["next_sentence_label"] = torch.tensor([e["next_sentence_label"] for e in examples])
        selected = self._select(examples, ids, attention_mask)
        batch["input_ids"], batch["labels"] = self.apply_mask(ids, selected)
        return batch

    def _select(self, examples, ids, attention_mask) -> torch.Tensor:
        maskable = attention_mask & ~self.is_special[ids]
        if not self.whole_word:
            return maskable & (torch.rand(ids.shape, generator=self.generator) < self.mlm_probability)
        word_ids = torch.full(ids.shape, -1, dtype=torch.long)
        for i, e in enumerate(examples):
            if "word_ids" not in e:
                raise ValueError("whole_word=True needs 'word_ids' in every example")
            w = [-1 if x is None else x for x in e["word_ids"]]
            word_ids[i, :len(w)] = torch.as_tensor(w, dtype=torch.long)
        n_words = int(word_ids.max()) + 1 if word_ids.numel() else 0
        pick = torch.rand(ids.shape[0], max(n_words, 1), generator=self.generator) < self.mlm_probability
        chosen = pick.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0)
        return maskable & chosen

    def apply_mask(self, ids: torch.Tensor, selected: torch.Tensor) -> tuple:
        """80/10/10 on the ``selected`` positions: returns (corrupted ids, labels)."""
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, generator=self.generator)
        to_mask = selected & (u < 0.8)
        to_random = selected & (u >= 0.8) & (u < 0.9)
        random_ids = self.replacement_ids[torch.randint(
            len(self.replacement_ids), ids.shape, generator=self.generator)]
        out = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out = torch.where(to_random, random_ids, out)
        return out, labels
