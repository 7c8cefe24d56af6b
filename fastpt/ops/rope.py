"""Fused rotary position embedding: ``fastpt::rope``, ``fastpt::rope_backward``, ``fastpt::rope_``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import (check_float, check_same_device, check_same_dtype, check_same_shape, check_type,
                                check_value, dtype_name, sizes)

_LAYOUTS = {"half": False, "interleaved": True}


def _interleaved(layout: str) -> bool:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'half' (Llama/NeoX) or 'interleaved' (GPT-J), got {layout!r}")
    return _LAYOUTS[layout]


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None,
         layout: str = "half") -> tuple[Tensor, Tensor]:
    """Rotate q and k by the angles of their positions (rotary position embedding).

    Args:
        q: (B, H, T, D), or any (..., T, D); float32, bfloat16 or float16. Strided views
            with a contiguous last dim (e.g. ``(B, T, H, D).transpose(1, 2)``) are read in place.
        k: (B, Hkv, T, D), same dtype, T and D as q; Hkv may differ from H (GQA).
        cos, sin: (P, R) tables, cos[p, i] = cos(p * theta_i), float32 or q's dtype. The first
            2R <= D features rotate; the rest pass through (partial rotary).
        position_ids: None (positions 0..T-1), or (T,) / (B, T) int64/int32 rows of cos/sin,
            e.g. ``offset + arange(T)`` when decoding with a KV cache.
        layout: "half" pairs feature i with i + R (Llama, HF rotate_half); "interleaved"
            pairs 2i with 2i + 1 (GPT-J).

    Returns:
        (q_rot, k_rot), new tensors of the inputs' shapes and dtype.

    Raises:
        TypeError: unsupported dtypes. ValueError: shapes, devices, layout, or (CPU)
        positions outside [0, P). On CUDA such positions are not checked on the host (it
        would wait for the GPU): their rows come out NaN in the rotated features instead.

    Gradients flow to q and k; cos and sin get none (they are fixed tables).
    """
    return torch.ops.fastpt.rope(q, k, cos, sin, position_ids, _interleaved(layout))


def rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None,
          layout: str = "half") -> tuple[Tensor, Tensor]:
    """In-place :func:`rope` for inference (e.g. writing into a KV cache); returns (q, k).

    Raises:
        RuntimeError: q or k requires grad while grad mode is on (use :func:`rope`).
        Otherwise as :func:`rope`.
    """
    interleaved = _interleaved(layout)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("rope_ is in-place and has no autograd; use fastpt.ops.rope for training")
    torch.ops.fastpt.rope_(q, k, cos, sin, position_ids, interleaved)
    return q, k


def _out_like(x: Tensor) -> Tensor:
    # Mirrors the C++ glue: a strided view with a contiguous last dim keeps its layout.
    src = x if (x.dim() <= 4 and x.stride(-1) == 1) else x.contiguous()
    return torch.empty_like(src)


def _check_inputs(q, k, cos, sin, position_ids):
    # csrc/ops/rope/rope_checks.h: check_inputs (positions in [0, P) need the data: real op only)
    check_float(q, "q")
    check_same_dtype(k, q, "k", "q")
    check_same_device("q", q, k=k)
    check_value(q.dim() >= 2 and k.dim() >= 2,
                lambda: f"q and k must be (..., T, D), got shapes {sizes(q)} and {sizes(k)}")
    check_value(q.shape[-1] == k.shape[-1] and q.shape[-2] == k.shape[-2],
                lambda: f"q and k must have the same T and D, got shapes {sizes(q)} and {sizes(k)}")
    check_value(q.dim() == 2 or k.dim() == 2 or q.shape[0] == k.shape[0],
                lambda: f"q and k must have the same batch size (dim 0), got {q.shape[0]} and {k.shape[0]}")
    check_float(cos, "cos")
    check_type(cos.dtype in (torch.float32, q.dtype), lambda: f"cos and sin must be float32 or the dtype of q "
               f"({dtype_name(q.dtype)}), got {dtype_name(cos.dtype)}")
    check_same_dtype(sin, cos, "sin", "cos")
    check_same_device("q", q, cos=cos, sin=sin)
    check_same_shape(sin, cos, "sin", "cos")
    D, T = q.shape[-1], q.shape[-2]
    check_value(cos.dim() == 2 and cos.shape[1] >= 1 and 2 * cos.shape[1] <= D,
                lambda: f"cos and sin must be (P, R) tables with 1 <= R <= D/2 = {D // 2}, got {sizes(cos)}")
    P = cos.shape[0]
    if position_ids is None:
        check_value(T <= P, lambda: f"without position_ids, positions are 0..T-1: T = {T} needs at least T rows "
                    f"in cos/sin, got {P}")
        return
    pos = position_ids
    check_same_device("q", q, position_ids=pos)
    check_type(pos.dtype in (torch.int64, torch.int32),
               lambda: f"position_ids must be int64 or int32, got {dtype_name(pos.dtype)}")
    B = q.shape[0] if q.dim() > 2 else k.shape[0] if k.dim() > 2 else 1
    check_value((pos.dim() == 1 and pos.shape[0] == T) or
                (pos.dim() == 2 and pos.shape[1] == T and (pos.shape[0] == B or pos.shape[0] == 1)),
                lambda: f"position_ids must be (T,) or (B, T) = ({B}, {T}), got {sizes(pos)}")
    check_value(pos.dim() == 1 or pos.shape[0] == 1 or (q.dim() > 2 and k.dim() > 2),
                lambda: f"position_ids with one row per batch ({sizes(pos)}) need q and k both batched, got q "
                f"{sizes(q)} and k {sizes(k)}: a 2-D q or k has no batch to match them")


def _dense(t) -> bool:
    # Its elements fill storage_offset .. storage_offset + numel, once each: the strides,
    # sorted, are those of a contiguous tensor (size-1 dims aside).
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _share_memory(q, k) -> bool:
    # at::get_overlap_status(q, k) is Full or Partial: q and k are dense views of one storage
    # whose element ranges meet. Views the layout cannot decide (strided views interleaving
    # in one storage) are compared element by element by the real op only (it needs no data,
    # but O(numel) work that a fake kernel should not do).
    if q is k:
        return True
    if q.numel() == 0 or k.numel() == 0 or not torch._C._is_alias_of(q, k):
        return False
    if not (_dense(q) and _dense(k)):
        return False
    q0, k0 = q.storage_offset(), k.storage_offset()
    return q0 < k0 + k.numel() and k0 < q0 + q.numel()


def _check_inplace_targets(q, k):
    # rope_checks.h: check_rope_inplace_targets
    check_value(torch._debug_has_internal_overlap(q) != 1 and torch._debug_has_internal_overlap(k) != 1,
                lambda: "rope_: q and k must not have elements that share memory (an expanded view?); "
                "use fastpt.ops.rope")
    check_value(not _share_memory(q, k), lambda: "rope_: q and k share memory (each element would be rotated "
                "twice); pass separate tensors or use fastpt.ops.rope")


@torch.library.register_fake("fastpt::rope")
def _rope_fake(q, k, cos, sin, position_ids, interleaved):
    _check_inputs(q, k, cos, sin, position_ids)
    return _out_like(q), _out_like(k)


@torch.library.register_fake("fastpt::rope_backward")
def _rope_backward_fake(grad_q, grad_k, cos, sin, position_ids, interleaved):
    _check_inputs(grad_q, grad_k, cos, sin, position_ids)  # (named q and k, as the C++ glue does)
    return _out_like(grad_q), _out_like(grad_k)


@torch.library.register_fake("fastpt::rope_")
def _rope_inplace_fake(q, k, cos, sin, position_ids, interleaved):
    _check_inputs(q, k, cos, sin, position_ids)
    _check_inplace_targets(q, k)
    return None


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, interleaved = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved = interleaved


def _backward(ctx, grad_q, grad_k):
    cos, sin, position_ids = ctx.saved_tensors
    gq, gk = torch.ops.fastpt.rope_backward(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved)
    return (gq if ctx.needs_input_grad[0] else None, gk if ctx.needs_input_grad[1] else None,
            None, None, None, None)


torch.library.register_autograd("fastpt::rope", _backward, setup_context=_setup_context)
