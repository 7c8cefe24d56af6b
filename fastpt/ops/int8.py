"""Int8 quantization and matmul in the style of LLM.int8() (Dettmers et al. 2022).

``fastpt::quantize_rowwise``, ``fastpt::outlier_columns``, ``fastpt::pack_int8_weight``,
``fastpt::unpack_int8_weight``, ``fastpt::int8_matmul`` and ``fastpt::int8_linear``.

Conventions: activations are quantized per row (absmax over the last dim, ``scale =
absmax / 127``, ``q = round(x / scale)``), weights per output channel (the rows of an
``nn.Linear`` weight, i.e. the same function). Scales are float32. Integer sums are exact
(int32, K < 2^17); the epilogue computes ``float(acc) * (scale_a[m] * scale_b[n]) + bias[n]``.
"""

from __future__ import annotations


import torch
from torch import Tensor

import fastpt._C as _C
from fastpt.ops._checks import (check_float, check_same_device, check_type, check_value,
                                dtype_name, num, sizes)

# LLM.int8's outlier threshold: columns with any |x| > 6 stay in 16/32-bit.
DEFAULT_THRESHOLD = 6.0
_KPAD, _NPAD = 64, 32
_PANEL_N = 16  # csrc/ops/int8/int8.h kPanelN
_MAX_K = (1 << 17) - 1  # int8_checks.h kMaxInt8K: sums stay exact in int32


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def quantize_rowwise(x: Tensor, skip_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8 quantization over the last dim.

    Args:
        x: (..., K) float32, bfloat16 or float16.
        skip_cols: optional (K,) bool; those columns are left out of the absmax and set to 0
            (LLM.int8's outlier columns, handled in higher precision).

    Returns:
        (q, scale): q int8 of x's shape with |q| <= 127 (round half to even), scale float32
        of shape x.shape[:-1] with x ~= q * scale[..., None].

    A row of zeros gets scale 0. A row holding NaN or +-Inf (outside skip_cols) gets scale
    NaN and q = 0, so whatever is computed from it is NaN, as a float matmul would be.
    """
    return torch.ops.fastpt.quantize_rowwise(x, skip_cols)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel int8 quantization of an (out, in) weight: quantize_rowwise."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    return quantize_rowwise(weight)


def dequantize_rowwise(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scale[..., None] in dtype (computed in float32)."""
    if q.dtype != torch.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    if scale.shape != q.shape[:-1]:
        raise ValueError(f"scale must have shape {tuple(q.shape[:-1])}, got {tuple(scale.shape)}")
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def outlier_columns(x: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """(K,) bool: columns of x (..., K) with any |value| > threshold. NaN is not an outlier."""
    return torch.ops.fastpt.outlier_columns(x, float(threshold))


def pack_int8_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(packed, colsum) of an (N, K) int8 weight in the layout the int8 kernels stream:
    (ceil(N/32)*2, ceil(K/64)*16, 16, 4) int8 and the (ceil(N/32)*32,) int32 row sums."""
    return torch.ops.fastpt.pack_int8_weight(weight)


def unpack_int8_weight(packed: Tensor, out_features: int, in_features: int) -> Tensor:
    """The (out_features, in_features) int8 weight of a packed one."""
    return torch.ops.fastpt.unpack_int8_weight(packed, out_features, in_features)


def int8_matmul(a: Tensor, b: Tensor, scale_a: Tensor | None = None, scale_b: Tensor | None = None,
                out_dtype: torch.dtype | None = None, bias: Tensor | None = None) -> Tensor:
    """out = (a @ b.T) * scale_a[:, None] * scale_b[None, :] + bias, summed exactly in int32.

    Args:
        a: (M, K) int8 (e.g. quantized activations).
        b: (N, K) int8, the nn.Linear weight layout (per-output-channel quantized weight).
        scale_a: (M,) float32; scale_b: (N,) float32.
        out_dtype: float32 (default with scales), bfloat16, float16, or int32 (default
            without scales): the exact integer sums, scales and bias must then be None.
        bias: (N,) float, added in float32.

    CPU: the fastest path this machine has (AMX, AVX-512 VNNI, AVX2, scalar; see
    ``fastpt._C.int8_matmul_path()``). b is packed on every call; ``fastpt.nn.Int8Linear``
    packs its weight once.
    """
    return torch.ops.fastpt.int8_matmul(a, b, scale_a, scale_b, out_dtype, bias)


def int8_linear(x: Tensor, weight_packed: Tensor, weight_colsum: Tensor, weight_scale: Tensor,
                out_features: int, bias: Tensor | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """LLM.int8 linear layer: x (..., K) float -> (..., out_features) in x's dtype.

    Columns of x with any |x| > threshold ("outliers") are multiplied in x's precision by the
    dequantized weight columns; the other columns are quantized row-wise to int8 and go
    through the int8 GEMM. ``threshold=math.inf`` disables the decomposition. The weight is
    the packed per-channel int8 weight (:func:`pack_int8_weight` of :func:`quantize_weight`).

    Gradient: to x only (grad_x = grad @ dequantized weight, in grad's dtype), and to bias
    if it requires grad; the int8 weight is frozen.

    The packed weight records in_features only rounded up to a multiple of 64, so this op
    checks x's last dim to that precision; ``fastpt.nn.Int8Linear`` checks it exactly.
    """
    return torch.ops.fastpt.int8_linear(x, weight_packed, weight_colsum, weight_scale, out_features,
                                        bias, float(threshold))


# ---------------------------------------------------------------- fake kernels

# The checks of csrc/ops/int8/int8_checks.h and int8_cpu.cpp, for the fake kernels.

def _check_int8(t, name):
    check_type(t.dtype == torch.int8, lambda: f"{name} must be int8, got {dtype_name(t.dtype)}")


def _check_rows(x):
    # quantize_rowwise / outlier_columns: x (..., K) float32, bfloat16 or float16
    check_float(x, "x", allow_float64=False)
    check_value(x.dim() >= 1, lambda: "x must have at least 1 dim, got a 0-dim tensor")


def _check_scale(s, n, name, a):
    check_value(s is not None, lambda: f"{name} is required unless out_dtype is int32")
    check_type(s.dtype == torch.float32, lambda: f"{name} must be float32, got {dtype_name(s.dtype)}")
    check_same_device("a", a, **{name: s})
    check_value(s.dim() == 1 and s.shape[0] == n, lambda: f"{name} must have shape ({n}), got {sizes(s)}")


def _check_bias(bias, n, ref, ref_name):
    if bias is None:
        return
    check_float(bias, "bias", allow_float64=False)
    check_same_device(ref_name, ref, bias=bias)
    check_value(bias.dim() == 1 and bias.shape[0] == n, lambda: f"bias must have shape ({n}), got {sizes(bias)}")


def _int8_matmul_check(a, b, scale_a, scale_b, out_dtype, bias) -> torch.dtype:
    """int8_checks.h: int8_matmul_check. Returns the output dtype."""
    _check_int8(a, "a")
    _check_int8(b, "b")
    check_same_device("a", a, b=b)
    check_value(a.dim() == 2, lambda: f"a must be 2-D (M, K), got shape {sizes(a)}")
    check_value(b.dim() == 2, lambda: f"b must be 2-D (N, K) (nn.Linear weight layout), got shape {sizes(b)}")
    check_value(a.shape[1] == b.shape[1], lambda: f"a and b must have the same inner dim K: a is {sizes(a)}, "
                f"b is {sizes(b)} (b is (N, K): out = a @ b.T)")
    check_value(a.shape[1] <= _MAX_K, lambda: f"K must be < 2^17 for exact int32 sums, got {a.shape[1]}")
    scaled = scale_a is not None or scale_b is not None
    dtype = out_dtype if out_dtype is not None else torch.float32 if scaled else torch.int32
    if dtype == torch.int32:
        check_value(not scaled and bias is None, lambda: "out_dtype int32 returns the exact integer sums: "
                    "scale_a, scale_b and bias must be None")
    else:
        check_type(dtype in (torch.float32, torch.bfloat16, torch.float16), lambda: "out_dtype must be int32, "
                   f"float32, bfloat16 or float16, got {dtype_name(dtype)}")
        _check_scale(scale_a, a.shape[0], "scale_a", a)
        _check_scale(scale_b, b.shape[0], "scale_b", a)
        _check_bias(bias, b.shape[0], a, "a")
    return dtype


def _int8_linear_check(x, packed, colsum, scale, n, bias, threshold):
    # int8_checks.h: int8_linear_check and check_packed
    check_float(x, "x", allow_float64=False)
    check_value(x.dim() >= 1, lambda: "x must have at least 1 dim, got a 0-dim tensor")
    check_value(n >= 1, lambda: f"out_features must be >= 1, got {n}")
    check_value(threshold > 0, lambda: f"threshold must be > 0 (inf: no outlier columns), got {num(threshold)}")
    k = x.shape[-1]
    check_value(k >= 1 and k <= _MAX_K, lambda: f"in_features must be in [1, 2^17), got {k}")
    _check_int8(packed, "weight_packed")
    check_same_device("x", x, weight_packed=packed, weight_colsum=colsum, weight_scale=scale)
    n_pad, k_pad = _round_up(n, _NPAD), _round_up(k, _KPAD)
    want = (n_pad // _PANEL_N, k_pad // 4, _PANEL_N, 4)
    check_value(tuple(packed.shape) == want, lambda: f"weight_packed must be the packed ({n}, {k}) weight of shape "
                f"{want} (fastpt.ops.pack_int8_weight), got {sizes(packed)} (does x's last dim match in_features?)")
    check_type(colsum.dtype == torch.int32, lambda: f"weight_colsum must be int32, got {dtype_name(colsum.dtype)}")
    check_value(colsum.dim() == 1 and colsum.shape[0] == n_pad,
                lambda: f"weight_colsum must have shape ({n_pad}), got {sizes(colsum)}")
    check_value(packed.is_contiguous() and colsum.is_contiguous(), lambda: "weight_packed and weight_colsum must "
                "be contiguous, as pack_int8_weight returns them (got strides "
                f"{list(packed.stride())} and {list(colsum.stride())})")
    check_type(scale.dtype == torch.float32, lambda: f"weight_scale must be float32, got {dtype_name(scale.dtype)}")
    check_value(scale.dim() == 1 and scale.shape[0] == n,
                lambda: f"weight_scale must have shape ({n}), got {sizes(scale)}")
    _check_bias(bias, n, x, "x")


@torch.library.register_fake("fastpt::quantize_rowwise")
def _quantize_fake(x, skip_cols):
    _check_rows(x)
    if skip_cols is not None:
        check_type(skip_cols.dtype == torch.bool, lambda: f"skip_cols must be bool, got {dtype_name(skip_cols.dtype)}")
        check_same_device("x", x, skip_cols=skip_cols)
        check_value(skip_cols.dim() == 1 and skip_cols.shape[0] == x.shape[-1],
                    lambda: f"skip_cols must have shape ({x.shape[-1]}), got {sizes(skip_cols)}")
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))


@torch.library.register_fake("fastpt::outlier_columns")
def _outlier_fake(x, threshold):
    _check_rows(x)
    check_value(threshold > 0, lambda: f"threshold must be > 0, got {num(threshold)}")
    return torch.empty(x.shape[-1:], dtype=torch.bool, device=x.device)


@torch.library.register_fake("fastpt::int8_matmul")
def _int8_matmul_fake(a, b, scale_a, scale_b, out_dtype, bias):
    dtype = _int8_matmul_check(a, b, scale_a, scale_b, out_dtype, bias)
    return torch.empty((a.shape[0], b.shape[0]), dtype=dtype, device=a.device)


@torch.library.register_fake("fastpt::int8_linear")
def _int8_linear_fake(x, weight_packed, weight_colsum, weight_scale, out_features, bias, threshold):
    _int8_linear_check(x, weight_packed, weight_colsum, weight_scale, out_features, bias, threshold)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------- autograd (int8_linear)

def _linear_setup(ctx, inputs, output):
    x, packed, _colsum, scale, n, bias, _threshold = inputs
    ctx.save_for_backward(packed, scale)
    ctx.shape = (n, x.shape[-1])
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def dequantize_packed_weight(packed: Tensor, scale: Tensor, out_features: int, in_features: int,
                             dtype: torch.dtype) -> Tensor:
    """The (out_features, in_features) dequantized weight of a packed one, in dtype."""
    return dequantize_rowwise(unpack_int8_weight(packed, out_features, in_features), scale, dtype)


def _linear_backward(ctx, grad):
    packed, scale = ctx.saved_tensors
    n, k = ctx.shape
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dequantize_packed_weight(packed, scale, n, k, grad.dtype)
    grad_bias = grad.reshape(-1, n).sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
    return grad_x, None, None, None, None, grad_bias, None


torch.library.register_autograd("fastpt::int8_linear", _linear_backward, setup_context=_linear_setup)


def int8_matmul_path() -> str:
    """The CPU int8 GEMM path the next call uses: "amx", "vnni", "avx2" or "scalar"."""
    return _C.int8_matmul_path()


__all__ = ["DEFAULT_THRESHOLD", "dequantize_packed_weight", "dequantize_rowwise", "int8_linear",
           "int8_matmul", "int8_matmul_path", "outlier_columns", "pack_int8_weight", "quantize_rowwise",
           "quantize_weight", "unpack_int8_weight"]

