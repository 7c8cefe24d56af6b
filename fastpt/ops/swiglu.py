"""Fused SwiGLU activation: ``fastpt::swiglu`` and ``fastpt::swiglu_backward``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device


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
    torch._check(up.shape == gate.shape,
                 lambda: f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_device("gate", gate, up=up)


@torch.library.register_fake("fastpt::swiglu")
def _swiglu_fake(gate, up):
    _check(gate, up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastpt::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate, up):
    _check(gate, up)
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
