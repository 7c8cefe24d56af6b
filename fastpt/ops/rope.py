"""Fused rotary position embedding: ``fastpt::rope``, ``fastpt::rope_backward``, ``fastpt::rope_``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device

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
        TypeError: unsupported dtypes. ValueError: shapes, devices, layout, or positions
        outside [0, P).

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


@torch.library.register_fake("fastpt::rope")
def _rope_fake(q, k, cos, sin, position_ids, interleaved):
    check_same_device("q", q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    torch._check(q.shape[-2:] == k.shape[-2:], lambda: "q and k must have the same T and D")
    torch._check(cos.shape == sin.shape and cos.dim() == 2 and 2 * cos.shape[1] <= q.shape[-1],
                 lambda: "cos and sin must be (P, R) tables with R <= D/2")
    return _out_like(q), _out_like(k)


@torch.library.register_fake("fastpt::rope_backward")
def _rope_backward_fake(grad_q, grad_k, cos, sin, position_ids, interleaved):
    return _out_like(grad_q), _out_like(grad_k)


@torch.library.register_fake("fastpt::rope_")
def _rope_inplace_fake(q, k, cos, sin, position_ids, interleaved):
    check_same_device("q", q, k=k, cos=cos, sin=sin, position_ids=position_ids)
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
