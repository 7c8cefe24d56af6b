"""Fused attention (FlashAttention-2 algorithm): ``fastpt::attention``, ``fastpt::attention_backward``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device


def _new_seed() -> Tensor:
    # Drawn from torch's default generator, so torch.manual_seed makes dropout reproducible.
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
              attn_bias: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention ``softmax(scale * q k^T + attn_bias + masks) v``, computed in tiles.

    Args:
        q: (B, H, T, D) queries; float32, bfloat16 or float16 (float64 for references).
            Strided views with a contiguous last dim, e.g. ``(B, T, H, D).transpose(1, 2)``,
            are read in place; other layouts are copied first.
        k, v: (B, Hkv, S, D), dtype and device of q; H must be a multiple of Hkv (GQA / MQA:
            query head h uses kv head h // (H // Hkv), without copying k and v).
        causal: query i sees keys j <= i + S - T (aligned bottom-right: with a KV cache the
            T new queries are the last T positions).
        key_padding_mask: (B, S) bool, True where the key may be attended (HF attention_mask == 1).
        attn_bias: float tensor broadcastable to (B, H, T, S), added to the scaled logits (T5's
            relative position bias). Its gradient is computed when it requires grad, at the cost
            of a (B, H, T, S) float32 buffer in the backward.
        scale: logit scale, default 1/sqrt(D) (T5 uses 1.0).
        dropout_p: attention dropout in [0, 1). The keep mask is a hash of a seed drawn from
            torch's generator (torch.manual_seed reproduces it) and the logit's position, so
            the backward recomputes the same mask. Pass 0 at evaluation time.
        return_lse: also return the (B, H, T) log-sum-exp of each row's logits.

    Returns:
        out (B, H, T, D) in q's dtype, or (out, lse) with lse float32 (float64 for float64
        inputs). A query row with no visible key (all masked) gives 0 and lse = -inf, and its
        gradients are 0, never NaN.

    Raises:
        TypeError: dtypes (non-float, q/k/v differ, mask not bool). ValueError: shapes, H not a
        multiple of Hkv, head dim outside [1, 256] (CUDA: [1, 128]),
        devices differ, dropout_p outside [0, 1).
    """
    D = q.shape[-1] if q.dim() else 0  # a 0-d q: the op's shape check names it
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seed = _new_seed() if dropout_p > 0 else None
    out, lse = torch.ops.fastpt.attention(q, k, v, key_padding_mask, attn_bias, bool(causal), float(scale),
                                          float(dropout_p), seed)
    return (out, lse) if return_lse else out


@torch.library.register_fake("fastpt::attention")
def _attention_fake(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed):
    check_same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask, attn_bias=attn_bias)
    torch._check(q.dim() == 4 and k.dim() == 4 and k.shape == v.shape, lambda: "q, k, v must be 4-D")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: "q, k and v must have the same dtype")
    torch._check(q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3], lambda: "B and D of q, k differ")
    B, H, T, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=lse_dtype)


@torch.library.register_fake("fastpt::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, causal, scale,
                             dropout_p, dropout_seed, bias_grad):
    check_same_device("q", q, grad_out=grad_out, k=k, v=v, out=out, lse=lse)
    gb = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gb


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, attn_bias, dropout_seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask, attn_bias, dropout_seed = ctx.saved_tensors
    bias_grad = attn_bias is not None and ctx.needs_input_grad[4]
    gq, gk, gv, gb = torch.ops.fastpt.attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, ctx.causal, ctx.scale, ctx.dropout_p,
        dropout_seed, bias_grad)
    need = ctx.needs_input_grad
    return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None, None,
            gb if bias_grad else None, None, None, None, None)


torch.library.register_autograd("fastpt::attention", _backward, setup_context=_setup_context)
