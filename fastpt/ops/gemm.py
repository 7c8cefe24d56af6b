"""Matrix products for linear layers: ``fastpt::gemm`` (CPU, float32 / float64) and ``linear``.

On x86 CPUs other than Intel's, torch's BLAS (MKL) runs its AVX2 kernels: one thread of this
project's AMD EPYC VM reaches ~100 GFLOP/s in fp32 there, against ~230 for fastpt's AVX-512
micro-kernel (``csrc/common/gemm_avx512.h``, blocked and threaded in
``csrc/ops/gemm/gemm_kernel.cpp``; shapes and numbers in the README, "Linear layers").
``linear`` takes that kernel for float32 CPU tensors on such CPUs and is ``F.linear``
everywhere else: CUDA (cuBLAS), other dtypes, under autocast (which casts to bf16/fp16 for
oneDNN), and on Intel CPUs, where MKL runs its AVX-512 / AMX kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastpt._C as _C
from fastpt.ops._checks import check_same_device

_FEATURES = _C.cpu_features()
_AVX512_BUILDS = ("AVX512", "AVX512_BF16")


def gemm(a: Tensor, b: Tensor, trans_a: bool = False, trans_b: bool = False) -> Tensor:
    """op(a) @ op(b), op(x) = x.T when its flag is set, for 2-D float32 / float64 CPU tensors.

    Any strides with one unit-stride dim are read in place; other layouts are copied. Returns
    a contiguous (m, n) tensor. float32 runs fastpt's AVX-512 kernel on non-Intel CPUs and MKL
    elsewhere; float64 runs MKL (for gradcheck). Differentiable in a and b.

    Raises:
        ValueError: a or b not 2-D, inner dimensions differ, devices differ.
        TypeError: dtype not float32 / float64, or a and b differ.
    """
    return torch.ops.fastpt.gemm(a, b, trans_a, trans_b)


@torch.compiler.assume_constant_result  # a compiled graph keeps the choice made when traced
def own_kernel_active() -> bool:
    """Whether ``linear`` uses fastpt's kernel for float32 CPU tensors on this machine now."""
    return not _FEATURES.get("intel", True) and _C.cpu_capability() in _AVX512_BUILDS


def uses_gemm(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs fastpt's kernel (else ``F.linear``)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 1 and not torch.is_autocast_enabled("cpu")
            and own_kernel_active())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (y = x W^T + b), through ``gemm`` where that is faster
    (module docstring), else ``F.linear`` itself. Same shapes, errors and gradients."""
    if not uses_gemm(x, weight) or x.shape[-1] != weight.shape[1]:
        return F.linear(x, weight, bias)
    y = gemm(x.reshape(-1, x.shape[-1]), weight, False, True).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


def _shape(a, b, trans_a, trans_b):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: f"gemm: a and b must be 2-D, got {tuple(a.shape)} and "
                 f"{tuple(b.shape)}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    torch._check(k == kb, lambda: f"gemm: inner dimensions differ: op(a) is {m} x {k}, op(b) is {kb} x {n}")
    return m, n


@torch.library.register_fake("fastpt::gemm")
def _gemm_fake(a, b, trans_a, trans_b):
    m, n = _shape(a, b, trans_a, trans_b)
    check_same_device("a", a, b=b)
    return a.new_empty((m, n))


def _setup_context(ctx, inputs, output):
    a, b, trans_a, trans_b = inputs
    ctx.trans_a, ctx.trans_b = trans_a, trans_b
    ctx.save_for_backward(a, b)


def _backward(ctx, grad):
    # C = A' B' with A' = op(A), B' = op(B): dA' = dC B'^T, dB' = A'^T dC, and dA = dA'^T where
    # A' = A^T (likewise B), each written as one gemm without materialising a transpose.
    a, b = ctx.saved_tensors
    ta, tb = ctx.trans_a, ctx.trans_b
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = gemm(b, grad, tb, True) if ta else gemm(grad, b, False, not tb)
    if ctx.needs_input_grad[1]:
        grad_b = gemm(grad, a, True, ta) if tb else gemm(a, grad, not ta, False)
    return grad_a, grad_b, None, None


torch.library.register_autograd("fastpt::gemm", _backward, setup_context=_setup_context)
