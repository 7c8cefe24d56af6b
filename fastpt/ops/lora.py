"""Fused LoRA linear (Hu et al. 2021): ``fastpt::lora_linear`` and its backward.

out = x @ W0.T + bias + scale * dropout(x) @ A.T @ B.T, with W0 (and bias) frozen:
gradients flow to x, A and B only. See csrc/ops/lora/lora.cpp for what is fused and saved.
"""

from __future__ import annotations

import math
import numbers

from typing import Callable

import torch
from torch import Tensor

from fastpt.ops._checks import check_dropout_seed, check_float, check_value, num


def lora_linear(x: Tensor, weight: Tensor | Callable[[Tensor], Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float, bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """x (..., in) -> (..., out): base(x) + scale * dropout(x) @ lora_a.T @ lora_b.T.

    Args:
        x: (..., in_features) float32, bfloat16, float16 (or float64).
        weight: the frozen base: an (out_features, in_features) weight of x's dtype, or a
            callable base layer (e.g. ``fastpt.nn.Int8Linear``; then bias must be None: the
            base adds its own).
        lora_a: (r, in_features); lora_b: (out_features, r); 1 <= r <= min(in, out).
        scale: alpha / r (or alpha / sqrt(r) for rsLoRA).
        bias: (out_features,) or None; frozen.
        dropout_p: dropout on the LoRA input, in [0, 1). The mask comes from a hash of a seed
            drawn from torch's default generator, so backward regenerates it instead of
            storing it (same seed -> same mask on CPU and CUDA).

    Under autocast (CPU or CUDA) every tensor is cast to autocast's dtype first, as
    nn.Linear would be; the LoRA factors still get float32 gradients.

    Raises:
        TypeError: dtypes differ or are unsupported.
        ValueError: shapes do not match, r out of range, dropout_p out of range.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    # Under torch.compile(dynamic=True) a float attribute arrives as a symbolic float, which
    # math.isfinite cannot trace: checked in eager mode only (LoRALinear checks it when built).
    if not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")  # inf / NaN: an output of NaN
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64) if dropout_p > 0 else None
    if not isinstance(weight, Tensor) and bias is not None:
        raise ValueError("bias must be None with a base layer: the layer adds its own")
    base_out = None if isinstance(weight, Tensor) else weight(x)
    weight = weight if isinstance(weight, Tensor) else None
    x, weight, base_out, lora_a, lora_b, bias = _autocast(x, weight, base_out, lora_a, lora_b, bias)
    return torch.ops.fastpt.lora_linear(x, weight, base_out, lora_a, lora_b, float(scale), bias,
                                        float(dropout_p), seed)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under autocast, run in autocast's dtype as nn.Linear would: a custom op is not cast by
    autocast itself, and the kernel wants one dtype (frozen float32 weights, bf16 inputs).
    The casts of lora_a/lora_b are differentiable, so their gradients arrive in float32."""
    x = tensors[0]
    if x.dtype == torch.float64 or x.device.type == "meta" or \
            not torch.is_autocast_enabled(x.device.type):  # (meta has no autocast state)
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


@torch.library.register_fake("fastpt::hash_dropout")
def _hash_dropout_fake(x, p, seed):
    # csrc/ops/int8/int8_cpu.cpp hash_dropout_cpu and int8_weight.cpp check_dropout
    check_float(x, "x")
    check_value(0 <= p < 1, lambda: f"dropout_p must be in [0, 1), got {num(p)}")
    check_dropout_seed(p, seed, "dropout needs a seed: a one-element int64 tensor")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, base_out, a, b, scale, bias, p, seed = inputs
    ctx.save_for_backward(x, weight, a, b, seed)
    ctx.scale, ctx.p = scale, p
    ctx.has_base_out, ctx.has_bias = base_out is not None, bias is not None


def _backward(ctx, grad):
    x, weight, a, b, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_a, grad_b = torch.ops.fastpt.lora_linear_backward(
        grad, x, weight, a, b, ctx.scale, ctx.p, seed, need[0])
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need[6] else None
    return (grad_x if need[0] else None, None, grad if ctx.has_base_out and need[2] else None,
            grad_a if need[3] else None, grad_b if need[4] else None, None, grad_bias, None, None)


torch.library.register_autograd("fastpt::lora_linear", _backward, setup_context=_setup_context)
