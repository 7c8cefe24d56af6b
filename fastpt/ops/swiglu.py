"""Fused SwiGLU activation: ``fastpt::swiglu`` and ``fastpt::swiglu_backward``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import check_float, check_same_device, check_same_dtype, check_same_shape


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, computed in float32 (the activation of Llama's gated MLP).

    Args:
        gate: (...) float32, bfloat16 or float16, any shape.
        up: same shape, dtype and device as gate.

    Returns:
        Tensor of gate's shape and dtype, contiguous.

    Raises:
        TypeError: unsupported dtype, or up's dtype differs from gate's.
        ValueError: shapes or devices differ.

    NaN/Inf follow eager PyTorch (silu(-inf) * up = -0 * up). Gradients flow to both inputs.
    """
    return torch.ops.fastpt.swiglu(gate, up)


def _check(gate, up):
    # csrc/ops/swiglu/swiglu_checks.h: swiglu_check_pair
    check_float(gate, "gate")
    check_same_dtype(up, gate, "up", "gate")
    check_same_device("gate", gate, up=up)
    check_same_shape(up, gate, "up", "gate")


@torch.library.register_fake("fastpt::swiglu")
def _swiglu_fake(gate, up):
    _check(gate, up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastpt::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate, up):
    _check(gate, up)  # swiglu_check_backward
    check_same_dtype(grad_out, gate, "grad_out", "gate")
    check_same_device("gate", gate, grad_out=grad_out)
    check_same_shape(grad_out, gate, "grad_out", "gate")
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = torch.ops.fastpt.swiglu_backward(grad_out, gate, up)
    return (grad_gate if ctx.needs_input_grad[0] else None,
            grad_up if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("fastpt::swiglu", _backward, setup_context=_setup_context)
