"""Sentence embeddings (Sentence-BERT style): pooled encoder states, trained with a triplet
loss (Euclidean, margin) or in-batch negatives (cosine similarity x scale, cross-entropy)."""

from __future__ import annotations

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
    if not texts:
        raise ValueError("no texts to encode")
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
            out.append(embed(backbone, ids, mask, pooling=pooling, normalize=normalize))
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0) -> Tensor:
    """mean(max(0, |a - p| - |a - n| + margin)), Euclidean distances."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    d_pos = (anchor - positive).norm(dim=-1)
    d_neg = (anchor - negative).norm(dim=-1)
    return torch.relu(d_pos - d_neg + margin).mean()


def in_batch_negatives_loss(anchor: Tensor, positive: Tensor, scale: float = 20.0) -> Tensor:
    """Cross-entropy over cosine similarities x ``scale``: row i's positive is column i,
    every other row's positive is a negative (MultipleNegativesRankingLoss)."""
    sims = nn.functional.normalize(anchor, dim=-1) @ nn.functional.normalize(positive, dim=-1).T
    return nn.functional.cross_entropy(scale * sims.float(), torch.arange(len(anchor), device=anchor.device))
