"""Fused RMSNorm: ``fastpt::rms_norm`` and ``fastpt::rms_norm_backward``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = x / sqrt(mean(x**2, -1) + eps) * weight, computed in float32.

    Args:
        x: (..., N) float32, bfloat16 or float16; any leading dims, any N.
        weight: (N,) same dtype and device as x.
        eps: positive, finite.

    Returns:
        (..., N) tensor of x's dtype, contiguous.

    Raises:
        TypeError: x is not a float32/bfloat16/float16 tensor, or weight's dtype differs.
        ValueError: weight's shape is not (N,), devices differ, or eps <= 0 / not finite.

    NaN or Inf in a row gives NaN in that row, as in eager PyTorch. Gradients flow to x and
    weight (first order only).
    """
    return torch.ops.fastpt.rms_norm(x, weight, eps)[0]


@torch.library.register_fake("fastpt::rms_norm")
def _rms_norm_fake(x, weight, eps):
    torch._check(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                 lambda: f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    check_same_device("x", x, weight=weight)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y, x.new_empty(x.shape[:-1], dtype=stats)


@torch.library.register_fake("fastpt::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = torch.ops.fastpt.rms_norm_backward(grad_y, x, weight, rstd)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None, None)


torch.library.register_autograd("fastpt::rms_norm", _backward, setup_context=_setup_context)
