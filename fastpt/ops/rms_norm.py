"""Fused RMSNorm: ``fastpt::rms_norm`` and ``fastpt::rms_norm_backward``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpt.ops._checks import (check_float, check_same_device, check_same_dtype, check_same_shape, check_type,
                                check_value, compute_dtype, dtype_name, num, sizes)


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


# The checks of csrc/ops/rms_norm/rms_norm_checks.h, for the fake kernels.
def _check_inputs(x, weight):
    check_float(x, "x")
    check_same_dtype(weight, x, "weight", "x")
    check_same_device("x", x, weight=weight)
    check_value(x.dim() >= 1, lambda: "x must have at least 1 dimension, got a scalar")
    check_value(weight.dim() == 1 and weight.shape[0] == x.shape[-1],
                lambda: f"weight must have shape ({x.shape[-1]},) to match the last dim of x, got {sizes(weight)}")


@torch.library.register_fake("fastpt::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _check_inputs(x, weight)
    check_value(math.isfinite(eps) and eps > 0, lambda: f"eps must be a positive finite number, got {num(eps)}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))


@torch.library.register_fake("fastpt::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, x, weight, rstd):
    _check_inputs(x, weight)
    check_same_dtype(grad_y, x, "grad_y", "x")
    check_same_shape(grad_y, x, "grad_y", "x")
    stats = compute_dtype(x.dtype)
    check_type(rstd.dtype == stats, lambda: f"rstd must be {dtype_name(stats)} for x of dtype "
               f"{dtype_name(x.dtype)}, got {dtype_name(rstd.dtype)}")
    check_value(rstd.numel() == math.prod(x.shape[:-1]), lambda: "rstd must have one value per row of x")
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
