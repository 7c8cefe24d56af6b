"""oneDNN's linear (``torch.ops.mkldnn``, shipped in torch's x86 CPU wheels), for inference.

bf16 (under autocast): ``F.linear`` runs oneDNN too, but reorders the weight into oneDNN's
blocked layout on every call and applies an activation as a separate pass. Packing once and
calling ``_linear_pointwise`` (what ``torch.compile`` with freezing emits for CPU linears)
saves both. NOTE: 2 threads, AMD EPYC (AVX512_BF16), BERT-base products with 1024 rows:
740-930 GFLOP/s per ``F.linear`` call against 980-1000 packed; 768 -> 3072 with GELU
6.25 -> 5.12 ms.

float32: on CPUs where fastpt's own GEMM replaces MKL (``gemm.own_kernel_active``), oneDNN's
own AVX-512 kernel is faster for x W^T + b with 1024 rows or more, with the weight as it is
(no copy); ``gemm._ONEDNN_ROWS`` has the numbers. oneDNN has no backward for these ops:
training keeps fastpt's GEMM.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# HF activation name -> (oneDNN post-op, its algorithm); None: no activation.
POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
            "relu": ("relu", "")}


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's linear ops (float32 runs on any x86-64 CPU)."""
    try:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bf16_available() -> bool:
    """``available()`` and this CPU runs oneDNN's bf16 natively (AVX512_BF16 or AMX)."""
    try:
        return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def pack(weight: Tensor, rows_hint: int) -> Tensor:
    """The (out, in) weight in bf16, reordered for products of about ``rows_hint`` rows
    (any row count works; the hint picks the blocking)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), rows_hint)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None = None) -> Tensor:
    """activation(x W^T + b), the activation fused, in the weight's dtype: a ``pack``ed bf16
    weight (x and bias cast to bf16) or a float32 one as it is. No autograd."""
    attr, algorithm = POST_OPS[activation]
    dtype = weight.dtype
    b = None if bias is None else bias.detach().to(dtype).contiguous()  # oneDNN ignores strides
    return torch.ops.mkldnn._linear_pointwise(x.detach().to(dtype).contiguous(), weight.detach(), b, attr, [],
                                              algorithm)
