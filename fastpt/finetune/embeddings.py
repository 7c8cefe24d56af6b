"""Sentence embeddings (Sentence-BERT style): pooled encoder states, trained with a triplet
loss (Euclidean, margin) or in-batch negatives (cosine similarity x scale, cross-entropy)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fastpt.finetune.heads import features, pool
from fastpt.data.datasets import encode_padded


def embed(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, *,
          pooling: str = "mean", normalize: bool = False) -> Tensor:
    """(B, T) ids -> (B, d) sentence embeddings (differentiable)."""
    h, _ = features(backbone, input_ids, attention_mask)
    e = pool(h, attention_mask, pooling)
    return nn.functional.normalize(e, dim=-1) if normalize else e


@torch.no_grad()
def encode(backbone: nn.Module, tokenizer, texts: list[str], *, pooling: str = "mean",
           normalize: bool = True, batch_size: int = 64) -> Tensor:
    """Embeddings of ``texts`` (N, d), in eval mode, in batches. A text with no token (an
    empty text, with a tokenizer that adds none) is refused: it would pool to nothing."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or \
            not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of strings, got {texts!r:.80}")
    if not texts:
        raise ValueError("no texts to encode")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(normalize, bool):  # "no" would normalize
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    limit = getattr(backbone.config, "max_position_embeddings", None)
    was_training = backbone.training
    backbone.eval()
    pad = getattr(backbone.config, "pad_token_id", None) or 0
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            ids, mask = encode_padded(tokenizer, texts[i:i + batch_size], pad)
            empty = (~mask.bool().any(1)).nonzero()
            if len(empty):  # named here by its index in texts, not by its row in this batch
                j = i + int(empty[0, 0])
                raise ValueError(f"texts[{j}] = {texts[j]!r} has no tokens: there is nothing to embed")
            lengths = mask.sum(1)
            if limit is not None and int(lengths.max()) > limit:  # the model would name no text
                j = i + int(lengths.argmax())
                raise ValueError(f"texts[{j}] has {int(lengths.max())} tokens, more than the model's "
                                 f"{limit} positions (max_position_embeddings): shorten it")
            out.append(embed(backbone, ids, mask, pooling=pooling, normalize=normalize))
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def _check_embeddings(name: str, t) -> None:
    """``t`` a (B, d) batch of embeddings with B >= 1: a loss over no row is NaN."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a (B, d) tensor of embeddings, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be (B, d) embeddings with B >= 1, got shape {tuple(t.shape)}")


def _check_number(name: str, value, lowest: float, strict: bool) -> None:
    # NaN passes every comparison check as False: the loss would be NaN without a word.
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) \
        and (value > lowest if strict else value >= lowest)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lowest}, got {value!r}")


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0) -> Tensor:
    """mean(max(0, |a - p| - |a - n| + margin)), Euclidean distances; all three (B, d)."""
    _check_number("margin", margin, 0, strict=False)
    _check_embeddings("anchor", anchor)
    for name, t in (("positive", positive), ("negative", negative)):
        _check_embeddings(name, t)
        if t.shape != anchor.shape:  # a (1, d) would broadcast against every anchor
            raise ValueError(f"{name} must be (B, d) = {tuple(anchor.shape)} like anchor (one per anchor "
                             f"row), got {tuple(t.shape)}")
    d_pos = (anchor - positive).norm(dim=-1)
    d_neg = (anchor - negative).norm(dim=-1)
    return torch.relu(d_pos - d_neg + margin).mean()


def in_batch_negatives_loss(anchor: Tensor, positive: Tensor, scale: float = 20.0) -> Tensor:
    """Cross-entropy over cosine similarities x ``scale``: row i's positive is column i,
    every other row's positive is a negative (MultipleNegativesRankingLoss). ``positive``
    may have more rows than ``anchor``: the extra ones are negatives only."""
    _check_number("scale", scale, 0, strict=True)
    _check_embeddings("anchor", anchor)
    _check_embeddings("positive", positive)
    if positive.shape[1] != anchor.shape[1]:
        raise ValueError(f"positive must have anchor's embedding size d = {anchor.shape[1]}, got "
                         f"shape {tuple(positive.shape)}")
    if positive.shape[0] < anchor.shape[0]:
        raise ValueError(f"positive must have a row for each of anchor's {anchor.shape[0]} rows (row i is "
                         f"anchor i's positive; more rows are extra negatives), got {positive.shape[0]}")
    sims = nn.functional.normalize(anchor, dim=-1) @ nn.functional.normalize(positive, dim=-1).T
    return nn.functional.cross_entropy(scale * sims.float(), torch.arange(len(anchor), device=anchor.device))
