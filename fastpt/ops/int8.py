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

import fastpt
from fastpt.ops._checks import check_same_device

# LLM.int8's outlier threshold: columns with any |x| > 6 stay in 16/32-bit.
DEFAULT_THRESHOLD = 6.0
_KPAD, _NPAD = 64, 32


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

def _int8_check(name: str, t: Tensor) -> None:
    torch._check(t.dtype == torch.int8, lambda: f"{name} must be int8, got {t.dtype}")


@torch.library.register_fake("fastpt::quantize_rowwise")
def _quantize_fake(x, skip_cols):
    check_same_device("x", x, skip_cols=skip_cols)
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))


@torch.library.register_fake("fastpt::outlier_columns")
def _outlier_fake(x, threshold):
    return torch.empty(x.shape[-1:], dtype=torch.bool, device=x.device)


@torch.library.register_fake("fastpt::int8_matmul")
def _int8_matmul_fake(a, b, scale_a, scale_b, out_dtype, bias):
    _int8_check("a", a)
    _int8_check("b", b)
    torch._check(a.shape[1] == b.shape[1], lambda: "a and b must have the same inner dim K")
    check_same_device("a", a, b=b, scale_a=scale_a, scale_b=scale_b, bias=bias)
    scaled = scale_a is not None or scale_b is not None
    dtype = out_dtype or (torch.float32 if scaled else torch.int32)
    return torch.empty((a.shape[0], b.shape[0]), dtype=dtype, device=a.device)


@torch.library.register_fake("fastpt::int8_linear")
def _int8_linear_fake(x, weight_packed, weight_colsum, weight_scale, out_features, bias, threshold):
    check_same_device("x", x, weight_packed=weight_packed, weight_colsum=weight_colsum,
                      weight_scale=weight_scale, bias=bias)
    torch._check(weight_packed.shape[1] * 4 == _round_up(x.shape[-1], _KPAD),
                 lambda: "x's last dim does not match the packed weight's in_features")
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
    return fastpt._C.int8_matmul_path()


__all__ = ["DEFAULT_THRESHOLD", "dequantize_packed_weight", "dequantize_rowwise", "int8_linear",
           "int8_matmul", "int8_matmul_path", "outlier_columns", "pack_int8_weight", "quantize_rowwise",
           "quantize_weight", "unpack_int8_weight"]

