"""Masked language modelling (BERT; RoBERTa's dynamic masking; whole-word masking).

Each non-special, non-padding position is selected with probability ``mlm_probability``
(0.15); a selected position becomes [MASK] with p = 0.8, a random non-special token with
p = 0.1, and stays unchanged with p = 0.1. Labels are the original ids at selected positions
and -100 elsewhere. Masks are drawn when a batch is collated, from the collator's own
``torch.Generator``, so every epoch sees new masks (dynamic masking) and a seed reproduces them.
"""

from __future__ import annotations

import numbers

import torch

from fastpt.data.datasets import check_pad_to_multiple_of, pad_batch, reseed_in_worker
from fastpt.models.common import IGNORE_INDEX, check_ids
from fastpt.models.encoder import Encoder
from fastpt._checks import check_bool, check_int



def _check_token_id(name: str, value, missing_hint: str) -> None:
    """A special-token id must be an int: ``special_ids(tok).mask`` is None for a tokenizer
    without [MASK], which otherwise failed as a TypeError while sorting the special ids."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = f": {missing_hint}" if value is None else ""
        raise ValueError(f"{name} must be an int token id, got {value!r}{hint}")


def _all_or_none(examples: list, key: str) -> bool:
    """Whether the examples have ``key``: all of them or none (else ValueError naming the first
    without it). Looking at the first example alone dropped the key from the whole batch, or
    failed with a KeyError, when only some had it."""
    has = [key in e for e in examples]
    if any(has) and not all(has):
        raise ValueError(f"example {has.index(False)} has no {key!r} while example {has.index(True)} has: "
                         f"every example of a batch needs {key!r}, or none")
    return has[0]


def _nsp_labels(examples: list) -> torch.Tensor:
    """The (B,) next-sentence labels: IsNext 0, NotNext 1 or IGNORE_INDEX. Others were batched
    as they were (a float tensor for 0.7, a bool one for True, 2 for a two-class head) and
    failed in the model's loss or trained on a wrong target."""
    labels = [e["next_sentence_label"] for e in examples]
    # 0-d integer tensors (a dataset's own labels) count as their int.
    labels = [int(x) if torch.is_tensor(x) and x.dim() == 0 and not (x.is_floating_point() or x.dtype == torch.bool)
              else x for x in labels]
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or label not in (0, 1, IGNORE_INDEX):
            raise ValueError(f"next_sentence_label of example {i} must be 0 (IsNext), 1 (NotNext) or "
                             f"{IGNORE_INDEX} (ignored), got {label!r}")
    return torch.tensor([int(label) for label in labels])


class MLMCollator:
    """Collate ``{"input_ids", ["token_type_ids"], ["word_ids"]}`` examples into an MLM batch.

    ``special_ids``: every id that must never be masked or drawn as a random replacement.
    ``whole_word=True`` needs ``word_ids`` per example (the tokenizer's ``Encoding.word_ids``,
    None for special tokens): words are selected with ``mlm_probability`` and all their pieces
    are masked together, each piece replaced 80/10/10 independently as in HF's collator. A
    word is keyed by (segment, word id), since tokenizers number the words of a pair's second
    segment from 0 again.
    Positions (words) are selected independently, as in HF's collator; a sequence left with
    none gets one chosen uniformly among its maskable ones, as BERT's and ELECTRA's data code
    predict max(1, round(n * p)) tokens (so a sequence of n maskable tokens has
    n * p + (1 - p)^n selected on average: 15% up to 1e-4 from n = 40).
    Inside a DataLoader worker the generator is reseeded from the worker's seed
    (``reseed_in_worker``), so workers and epochs draw different masks. Under the ``Trainer``
    it is restarted for every batch from (seed, rank, epoch, batch index) instead
    (``seed_collator``): ranks draw different masks, and a resumed run the same ones.
    Raises ValueError for a ``mask_id`` or ``pad_id`` that is not an int (None: the tokenizer
    lacks the token), special ids outside the vocabulary, or a vocabulary of special ids only,
    and for a ``pad_to_multiple_of`` other than None or an int >= 1. A batch raises TypeError
    for ids that are not integers and ValueError for ids outside the vocabulary, for
    ``token_type_ids`` of another length than their ``input_ids``, and where only some examples
    have ``token_type_ids`` or ``next_sentence_label``.
    """

    def __init__(self, vocab_size: int, mask_id: int, pad_id: int, special_ids, *,
                 mlm_probability: float = 0.15, whole_word: bool = False, seed: int = 0,
                 pad_to_multiple_of: int | None = None):
        if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, numbers.Real):
            raise TypeError(f"mlm_probability must be a number, got {mlm_probability!r}")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        # A float or bool vocab_size failed inside torch.zeros, naming neither.
        check_int("vocab_size", vocab_size, minimum=1)
        check_bool("whole_word", whole_word)
        check_int("seed", seed)
        _check_token_id("mask_id", mask_id, "the tokenizer has no mask token such as [MASK]; MLM and "
                        "ELECTRA need one (a wordpiece tokenizer has it)")
        _check_token_id("pad_id", pad_id, "the tokenizer has no padding token such as [PAD]")
        check_pad_to_multiple_of(pad_to_multiple_of)
        if isinstance(special_ids, (str, bytes)) or not hasattr(special_ids, "__iter__"):
            raise TypeError(f"special_ids must be a collection of int token ids, got {special_ids!r}")
        special_ids = list(special_ids)
        for i in special_ids:  # a float id indexed is_special cut (3.5 -> 3), True stood for 1
            _check_token_id("each of special_ids", i, "special_ids(tokenizer).all gives a tokenizer's special ids")
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
        if not len(self.replacement_ids):  # else torch.randint fails at the first batch
            raise ValueError(f"all {vocab_size} ids are special: no id left to draw as a random replacement "
                             f"(MLM needs a vocabulary with at least one ordinary token)")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        reseed_in_worker(self, self.seed)
        ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.pad_id,
                                        self.pad_to_multiple_of)
        check_ids("token ids", ids, self.vocab_size, "vocab_size")
        batch = {"input_ids": ids, "attention_mask": attention_mask}
        if _all_or_none(examples, "token_type_ids"):
            for i, e in enumerate(examples):
                # pad_batch would pad a short list with segment 0 and cut nothing from a long one
                if len(e["token_type_ids"]) != len(e["input_ids"]):
                    raise ValueError(f"token_type_ids of example {i} must give one segment id per token: "
                                     f"{len(e['token_type_ids'])} ids for {len(e['input_ids'])} tokens")
            batch["token_type_ids"], _ = pad_batch([e["token_type_ids"] for e in examples], 0,
                                                   self.pad_to_multiple_of, name="token_type_ids")
        if _all_or_none(examples, "next_sentence_label"):  # MLM + NSP batches (BERT pre-training)
            batch["next_sentence_label"] = _nsp_labels(examples)
        selected = self._select(examples, ids, attention_mask)
        batch["input_ids"], batch["labels"] = self.apply_mask(ids, selected)
        return batch

    def _select(self, examples, ids, attention_mask) -> torch.Tensor:
        maskable = attention_mask & ~self.is_special[ids]
        if not self.whole_word:
            drawn = maskable & (torch.rand(ids.shape, generator=self.generator) < self.mlm_probability)
            return self._at_least_one(drawn, maskable)
        word_ids = torch.full(ids.shape, -1, dtype=torch.long)
        for i, e in enumerate(examples):
            if "word_ids" not in e:
                raise ValueError("whole_word=True needs 'word_ids' in every example")
            if any(isinstance(x, bool) or not isinstance(x, (numbers.Integral, type(None))) for x in e["word_ids"]):
                # as_tensor(dtype=long) cut float word ids: 0.5 and 0.7 became one word
                raise TypeError(f"word_ids of example {i} must hold an int word id (or None) per token, "
                                f"got {list(e['word_ids'])!r}")
            w = torch.as_tensor([-1 if x is None else x for x in e["word_ids"]], dtype=torch.long)
            if len(w) != len(e["input_ids"]) or bool((w < -1).any()):
                raise ValueError(f"word_ids of example {i} must give one non-negative word id (or None) "
                                 f"per token: {len(w)} word ids for {len(e['input_ids'])} tokens")
            if "token_type_ids" in e and len(w):
                # Pair encodings number B's words from 0 again: without the segment in the key,
                # word k of A and word k of B would always be selected together.
                types = torch.as_tensor(e["token_type_ids"], dtype=torch.long)
                if types.shape != w.shape or bool((types < 0).any()):
                    raise ValueError(f"token_type_ids of example {i} must give one segment id >= 0 "
                                     f"per token: {len(types)} ids for {len(w)} tokens")
                w = torch.where(w >= 0, w + types * (int(w.max()) + 1), w)
            if len(w) and int(w.max()) >= len(w):
                # Sparse ids (a window cut from a longer text, or a hostile 10**9): numbered
                # 0, 1, ... in order, the same words, instead of a draw per id up to the largest.
                w = w.clone()
                w[w >= 0] = torch.unique(w[w >= 0], return_inverse=True)[1]
            word_ids[i, :len(w)] = w
        n_words = int(word_ids.max()) + 1 if word_ids.numel() else 0
        pick = torch.rand(ids.shape[0], max(n_words, 1), generator=self.generator) < self.mlm_probability
        # words with at least one maskable piece (column 0 collects the non-words, id -1)
        pieces = torch.zeros(ids.shape[0], max(n_words, 1) + 1, dtype=torch.long)
        pieces.scatter_add_(1, word_ids + 1, maskable.long())
        word_maskable = pieces[:, 1:] > 0
        pick = self._at_least_one(pick & word_maskable, word_maskable)
        chosen = pick.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0)
        return maskable & chosen

    def _at_least_one(self, selected: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``selected`` with one uniform candidate added to each row that has candidates but
        no selection. With independent draws a short sequence often gets no label, and a batch
        with no label at all has no MLM loss (a mean over zero tokens: NaN in training)."""
        empty = ~selected.any(1) & candidates.any(1)
        if not bool(empty.any()):  # the usual case draws nothing more: masks stay as they were
            return selected
        score = torch.rand(selected.shape, generator=self.generator).masked_fill(~candidates, -1.0)
        rows = empty.nonzero().squeeze(1)
        selected = selected.clone()
        selected[rows, score[rows].argmax(1)] = True
        return selected

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


def mlm_nsp_loss_terms(batch: dict) -> dict:
    """BERT's loss term by term, for ``Trainer(..., loss_terms=mlm_nsp_loss_terms)``: the
    Encoder's own :meth:`~fastpt.models.Encoder.loss_terms` (the model defines its loss)."""
    return Encoder.loss_terms(batch)
