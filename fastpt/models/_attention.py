"""The one attention function every model calls (self-, cross- and cached attention).

Semantics (those of ``fastpt.ops.attention``, issue F3): q (B, H, T, D), k/v (B, Hkv, S, D)
with H % Hkv == 0 (GQA: each kv head serves H // Hkv query heads, never copied);
``key_padding_mask`` (B, S) bool, True = the key may be attended; ``causal`` aligned
bottom-right (query i sees keys j <= i + S - T, as when decoding after S - T cached
tokens); ``attn_bias`` additive, broadcastable to (B, H, T, S); ``scale`` default
1/sqrt(D); a query row with no key to attend gets zeros (never NaN: left padding in
batched generation produces such rows).

``use_fused=False`` is the A/B reference: explicit matmul-softmax-matmul in float32.

``use_fused=True`` calls ``fastpt.ops.attention``, which also differentiates ``attn_bias``
when it requires grad (T5's learned relative position bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _allowed(T: int, S: int, causal: bool, key_padding_mask: Tensor | None,
             device) -> Tensor | None:
    """Bool (B or 1, 1, T, S) of the pairs that may attend, or None when all may."""
    allowed = None
    if causal:
        i = torch.arange(T, device=device).unsqueeze(1)
        j = torch.arange(S, device=device)
        allowed = (j <= i + (S - T)).view(1, 1, T, S)
    if key_padding_mask is not None:
        keys = key_padding_mask.to(torch.bool).view(key_padding_mask.shape[0], 1, 1, S)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention wants q (B, H, T, D), k and v (B, Hkv, S, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D, "
                         "or H is not a multiple of Hkv")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (B, S) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")


def attend_eager(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                 key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None,
                 scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """Reference attention in float32 math (differentiable in q, k, v and attn_bias)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # (B, Hkv, G * T, D) x (B, Hkv, D, S): the G query heads of a kv head are rows of one
    # product (a broadcast over G would have matmul copy k and v G times).
    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    scores = scores.reshape(B, H, T, S)
    if attn_bias is not None:
        scores = scores + attn_bias.float()
    allowed = _allowed(T, S, causal, key_padding_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:  # rows with no allowed key: softmax gave NaN, the result is 0
        probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    out = torch.matmul(probs.reshape(B, Hkv, G * T, S), v.float())
    return out.reshape(B, H, T, D).to(q.dtype)


def _attend_fused(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None,
                  attn_bias: Tensor | None, scale: float | None, dropout_p: float) -> Tensor:
    from fastpt.ops import attention
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool)
    if attn_bias is not None and attn_bias.dtype != q.dtype:
        attn_bias = attn_bias.to(q.dtype)
    return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                     attn_bias=attn_bias, scale=scale, dropout_p=dropout_p)


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
           key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None,
           scale: float | None = None, dropout_p: float = 0.0, use_fused: bool = True) -> Tensor:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D); returns (B, H, T, D) in q's dtype.

    A decoding step (one query per row) runs the fused op's single-query kernel: the kv
    head's G queries against one pass over its cache rows, on the calling thread."""
    _check(q, k, v, key_padding_mask)
    if causal and q.shape[2] == 1:  # one query, aligned at the end: it sees every key
        causal = False
    if use_fused:
        return _attend_fused(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                             attn_bias=attn_bias, scale=scale, dropout_p=dropout_p)
    return attend_eager(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                        attn_bias=attn_bias, scale=scale, dropout_p=dropout_p)
