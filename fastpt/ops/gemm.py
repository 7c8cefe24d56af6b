"""Matrix products for linear layers: ``fastpt::gemm`` (CPU; float32, bfloat16, float64) and
``linear``.

On x86 CPUs other than Intel's, torch's BLAS (MKL) runs its AVX2 kernels: one thread of this
project's AMD EPYC VM reaches ~100 GFLOP/s in fp32 there, against ~230 for fastpt's AVX-512
micro-kernel (``csrc/common/gemm_avx512.h``, blocked and threaded in
``csrc/ops/gemm/gemm_kernel.cpp``; shapes and numbers in the README, "Linear layers").
``linear`` takes that kernel for float32 CPU tensors on such CPUs, and for bf16
matrix-vector products (decoding; MKL/oneDNN read the weights at about half the rate), and
is ``F.linear`` everywhere else: CUDA (cuBLAS), other dtypes, larger products under autocast
(oneDNN's bf16 kernels), and on Intel CPUs, where MKL runs its AVX-512 / AMX kernels.
Without autograd (inference), a float32 product of 1024 rows or more on such a CPU runs
oneDNN's kernel instead (``fastpt.ops._onednn``: faster there, but no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastpt._C as _C
from fastpt.ops import _onednn
from fastpt.ops._checks import (check_same_device, check_same_dtype, check_type, check_value, compute_dtype,
                                dtype_name, sizes)

def gemm(a: Tensor, b: Tensor, trans_a: bool = False, trans_b: bool = False) -> Tensor:
    """op(a) @ op(b), op(x) = x.T when its flag is set, for 2-D float32 / bfloat16 / float64
    CPU tensors.

    Any strides with one unit-stride dim are read in place; other layouts are copied. Returns
    a contiguous (m, n) tensor of the inputs' dtype (bf16: fp32 accumulation, rounded once).
    float32 and bfloat16 run fastpt's AVX-512 kernels on non-Intel CPUs (bf16 products of
    more than 4 rows: VDPBF16PS where the CPU has AVX512_BF16) and MKL elsewhere; float64 runs
    MKL (for gradcheck). Differentiable in a and b.

    Raises:
        ValueError: a or b not 2-D, inner dimensions differ, devices differ.
        TypeError: dtype not float32 / bfloat16 / float64, or a and b differ.
    """
    return torch.ops.fastpt.gemm(a, b, trans_a, trans_b)


def gemm_into_(c: Tensor, a: Tensor, b: Tensor, trans_a: bool = False, trans_b: bool = False, *,
               accumulate: bool = False) -> Tensor:
    """c = op(a) @ op(b), or c += op(a) @ op(b) with ``accumulate``, in place; returns c.

    c: contiguous (m, n) float32 (float64 for float64 a and b; bfloat16 a and b accumulate in
    float32). For an output reused across calls (no new allocation: large ones page-fault
    their memory in on every call) and for sums of products, e.g. a weight gradient summed
    over chunks of rows, with no temporary and no rounding of the partial sums. CPU only, no
    autograd.

    Raises:
        ValueError / TypeError: as :func:`gemm`; c of the wrong shape, dtype or layout.
    """
    if torch.is_grad_enabled() and (c.requires_grad or a.requires_grad or b.requires_grad):
        raise RuntimeError("gemm_into_ works in place and has no autograd; use fastpt.ops.gemm")
    torch.ops.fastpt.gemm_into_(c, a, b, trans_a, trans_b, accumulate)
    return c


@torch.compiler.assume_constant_result  # a compiled graph keeps the choice made when traced
def own_kernel_active() -> bool:
    """Whether ``linear`` uses fastpt's kernel for float32 CPU tensors on this machine now."""
    return _C.own_gemm_active()


# Rows up to which a bfloat16 product takes fastpt's matrix-vector path (csrc/common/gemm_avx512.h
# kGemvRows); larger bf16 products stay on oneDNN, which is as fast as fastpt's there.
_GEMV_ROWS = 4

# Rows from which an inference float32 product runs oneDNN's kernel instead of fastpt's.
# NOTE: 2 threads, medians of alternated rounds, x W^T + b, fastpt / oneDNN time: 1024 rows
# and more 1.02-1.14 with memory kept mapped (steady allocator), 1.14-1.35 with glibc's default
# (fastpt's product and its bias add each page-fault a fresh output); 8-512 rows 0.75-0.97
# steady, 1.01-1.07 default.
_ONEDNN_ROWS = 1024


def gemm_dtype(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> torch.dtype | None:
    """The dtype ``linear(x, weight, bias)`` runs fastpt's product in, or None for ``F.linear``:
    float32 (no autocast) on CPUs where the kernel is active; bfloat16 for matrix-vector
    products (decoding: up to 4 rows) with bf16 weights, plain or under bf16 autocast, no bias."""
    if x.device.type != "cpu" or weight.dim() != 2 or x.dim() < 1 or not own_kernel_active():
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device or bias.shape != weight.shape[:1]):
        return None  # F.linear's own promotion, broadcasting and errors
    rows = x.numel() // max(x.shape[-1], 1)
    bf16_gemv = weight.dtype == torch.bfloat16 and bias is None and rows <= _GEMV_ROWS
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if bf16_gemv and torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    if x.dtype == weight.dtype == torch.float32:
        return torch.float32
    return torch.bfloat16 if bf16_gemv and x.dtype == torch.bfloat16 else None


def onednn_inference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias)`` runs oneDNN's float32 kernel: where it would run
    fastpt's float32 product (``gemm_dtype``), for at least ``_ONEDNN_ROWS`` rows, when nothing
    needs a gradient and not while compiling (oneDNN's op has no backward)."""
    return _onednn_route(x, weight, bias, gemm_dtype(x, weight, bias))


def _onednn_route(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None) -> bool:
    # onednn_inference given gemm_dtype's answer (linear has it already).
    if torch.compiler.is_compiling() or dtype != torch.float32 or not _onednn.available():
        return False
    if x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.device != x.device or bias.shape != weight.shape[:1]):
        return False  # F.linear's promotion rules and errors
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return x.numel() // x.shape[-1] >= _ONEDNN_ROWS


def uses_gemm(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs fastpt's kernel (else ``F.linear``)."""
    return gemm_dtype(x, weight) is not None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (y = x W^T + b), through ``gemm`` where that is faster
    (module docstring, ``gemm_dtype``), else ``F.linear`` itself. Same shapes, dtypes, errors
    and gradients."""
    dtype = gemm_dtype(x, weight, bias)
    if dtype is None or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:  # (K = 0: bias or 0)
        return F.linear(x, weight, bias)
    if _onednn_route(x, weight, bias, dtype):
        return _onednn.linear(x, weight, bias)
    y = gemm(x.reshape(-1, x.shape[-1]).to(dtype), weight, False, True).view(*x.shape[:-1], weight.shape[0])
    if bias is None:
        return y
    # In place where the dtypes allow (the product's backward does not read its output): one
    # output allocated instead of two. (No time difference measured with warm heaps.)
    return y.add_(bias) if bias.dtype == y.dtype else y + bias


def _shape(a, b, trans_a, trans_b, what):
    # csrc/ops/gemm/gemm_cpu.cpp: product_dims. (m, n) of op(a) @ op(b).
    check_value(a.dim() == 2 and b.dim() == 2, lambda: f"{what}: a and b must be 2-D, got {sizes(a)} and {sizes(b)}")
    check_type(a.dtype in (torch.float32, torch.float64, torch.bfloat16),
               lambda: f"{what}: a must be float32, bfloat16 or float64, got {dtype_name(a.dtype)}")
    check_same_dtype(b, a, "gemm: b", "a")
    check_same_device("a", a, **{"gemm: b": b})
    m, k = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    check_value(k == kb, lambda: f"{what}: inner dimensions differ: op(a) is {m} x {k}, op(b) is {kb} x {n}")
    return m, n


@torch.library.register_fake("fastpt::gemm")
def _gemm_fake(a, b, trans_a, trans_b):
    m, n = _shape(a, b, trans_a, trans_b, "gemm")
    return a.new_empty((m, n))


@torch.library.register_fake("fastpt::gemm_into_")
def _gemm_into_fake(c, a, b, trans_a, trans_b, accumulate):
    m, n = _shape(a, b, trans_a, trans_b, "gemm_into_")
    acc = compute_dtype(a.dtype)
    check_type(c.dtype == acc, lambda: f"gemm_into_: c must be {dtype_name(acc)} for {dtype_name(a.dtype)} a and b, "
               f"got {dtype_name(c.dtype)}")
    check_same_device("a", a, **{"gemm_into_: c": c})
    check_value(c.dim() == 2 and c.shape[0] == m and c.shape[1] == n,
                lambda: f"gemm_into_: c must have shape ({m}, {n}), got {sizes(c)}")
    check_value(c.is_contiguous(), lambda: "gemm_into_: c must be contiguous (it is written in place)")
    check_value(not torch._C._is_alias_of(c, a) and not torch._C._is_alias_of(c, b),
                lambda: "gemm_into_: c must not share memory with a or b")
    return None


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
