"""Fused attention (FlashAttention-2 algorithm): ``fastpt::attention``, ``fastpt::attention_backward``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpt.ops._checks import (check_dropout_seed, check_float, check_same_device, check_same_dtype, check_type,
                                check_value, compute_dtype, dtype_name, num, sizes)

_MAX_HEAD_DIM = 256  # csrc/ops/attention/attention_checks.h kMaxHeadDim
_CUDA_MAX_HEAD_DIM = 128  # csrc/ops/attention/attention_cuda.h kAttentionCudaMaxHeadDim


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
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):  # q.dim() below failed with an AttributeError
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
    D = q.shape[-1] if q.dim() else 0  # a 0-d q: the op's shape check names it
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {num(dropout_p)}")
    seed = _new_seed() if dropout_p > 0 else None
    out, lse = torch.ops.fastpt.attention(q, k, v, key_padding_mask, attn_bias, bool(causal), float(scale),
                                          float(dropout_p), seed)
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, dropout_seed):
    # csrc/ops/attention/attention_checks.h: check_inputs (and the CUDA glue's head dim limit)
    check_float(q, "q")
    check_same_dtype(k, q, "k", "q")
    check_same_dtype(v, q, "v", "q")
    check_same_device("q", q, k=k, v=v)
    check_value(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q must be (B, H, T, D) and k, v "
                f"(B, Hkv, S, D), got shapes {sizes(q)}, {sizes(k)}, {sizes(v)}")
    check_value(k.shape == v.shape, lambda: f"k and v must have the same shape (B, Hkv, S, D), got {sizes(k)} "
                f"and {sizes(v)}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    check_value(k.shape[0] == B, lambda: f"k and v must have the batch size of q ({B}), got {k.shape[0]}")
    check_value(k.shape[3] == D, lambda: f"k and v must have the head dim of q ({D}), got {k.shape[3]}")
    check_value(Hkv >= 1 and H % Hkv == 0, lambda: f"the number of query heads ({H}) must be a multiple of the "
                f"number of key/value heads ({Hkv})")
    check_value(D >= 1 and D <= _MAX_HEAD_DIM, lambda: f"head dim D must be in [1, {_MAX_HEAD_DIM}], got {D}")
    check_value(math.isfinite(scale), lambda: f"scale must be finite, got {num(scale)}")
    check_value(0 <= dropout_p < 1, lambda: f"dropout_p must be in [0, 1), got {num(dropout_p)}")
    if key_padding_mask is not None:
        m = key_padding_mask
        check_same_device("q", q, key_padding_mask=m)
        check_type(m.dtype == torch.bool, lambda: f"key_padding_mask must be bool (True = attend), got "
                   f"{dtype_name(m.dtype)}")
        check_value(m.dim() == 2 and m.shape[0] == B and m.shape[1] == S,
                    lambda: f"key_padding_mask must be (B, S) = ({B}, {S}), got {sizes(m)}")
    if attn_bias is not None:
        bias = attn_bias
        check_same_device("q", q, attn_bias=bias)
        check_type(bias.dtype.is_floating_point, lambda: f"attn_bias must be a float tensor, got "
                   f"{dtype_name(bias.dtype)}")
        check_value(bias.dim() <= 4 and all(n == want or n == 1 for n, want in zip(bias.shape[::-1], (S, T, H, B))),
                    lambda: f"attn_bias must broadcast to (B, H, T, S) = ({B}, {H}, {T}, {S}), got {sizes(bias)}")
    check_dropout_seed(dropout_p, dropout_seed, "dropout_p > 0 needs dropout_seed, a one-element int64 tensor")
    if q.device.type == "cuda":
        check_value(D <= _CUDA_MAX_HEAD_DIM,
                    lambda: f"head dim D must be at most {_CUDA_MAX_HEAD_DIM} on CUDA, got {D}")


@torch.library.register_fake("fastpt::attention")
def _attention_fake(q, k, v, key_padding_mask, attn_bias, causal, scale, dropout_p, dropout_seed):
    _check_inputs(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, dropout_seed)
    B, H, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=compute_dtype(q.dtype))


@torch.library.register_fake("fastpt::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, causal, scale,
                             dropout_p, dropout_seed, bias_grad):
    _check_inputs(q, k, v, key_padding_mask, attn_bias, scale, dropout_p, dropout_seed)
    # attention_checks.h: check_backward
    check_same_dtype(grad_out, q, "grad_out", "q")
    check_same_device("q", q, grad_out=grad_out)
    check_same_dtype(out, q, "out", "q")
    check_same_device("q", q, out=out, lse=lse)
    check_value(grad_out.shape == q.shape and out.shape == q.shape, lambda: f"grad_out and out must have the "
                f"shape of q {sizes(q)}, got {sizes(grad_out)} and {sizes(out)}")
    check_value(lse.shape == q.shape[:3] and lse.dtype == compute_dtype(q.dtype), lambda: "lse must be the "
                f"forward's (B, H, T) log-sum-exp, got {sizes(lse)} {dtype_name(lse.dtype)}")
    check_value(not bias_grad or attn_bias is not None, lambda: "bias_grad needs attn_bias")
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
