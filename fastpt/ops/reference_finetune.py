"""Pure-PyTorch references of the fine-tuning ops (int8 matmul in the LLM.int8 style, LoRA),
for tests (in float64 / int64) and benchmarks (the eager baselines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quantize_rowwise(x: Tensor, skip_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8: the same float32 operations as the kernels (exact match)."""
    xf = x.float()
    if skip_cols is not None:
        xf = xf.masked_fill(skip_cols, 0.0)
    amax = xf.abs().amax(-1, keepdim=True)
    # rows with amax < 2^-64 prescaled by 2^64 (exact), as the kernels do: 127 / amax would be inf
    pre = torch.where(amax < 2.0**-64, 2.0**64, 1.0).to(torch.float32)
    safe = torch.where(amax > 0, amax * pre, torch.ones_like(amax))
    inv = torch.full_like(safe, 127.0) / safe  # not 127.0 / safe: that is reciprocal(safe) * 127
    q = torch.round(xf * pre * inv).clamp(-127, 127).to(torch.int8)
    return q, (amax / 127.0).squeeze(-1)


def int8_matmul(a: Tensor, b: Tensor, scale_a: Tensor | None = None, scale_b: Tensor | None = None,
                out_dtype: torch.dtype | None = None, bias: Tensor | None = None) -> Tensor:
    """a (M, K) int8 @ b (N, K).T summed exactly in int64, scaled in float64."""
    acc = a.long() @ b.long().T
    if scale_a is None and scale_b is None:
        return acc.to(torch.int32)
    out = acc.double() * scale_a.double()[:, None] * scale_b.double()[None, :]
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype or torch.float32)


def int8_linear(x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                threshold: float = 6.0) -> Tensor:
    """LLM.int8 forward (bitsandbytes' decomposition) in eager PyTorch, with torch._int_mm
    for the int8 part: outlier columns in x's dtype against the dequantized weight columns."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    outliers = (x2.abs() > threshold).any(0)
    xq, sx = quantize_rowwise(x2, outliers)
    acc = torch._int_mm(xq, weight_int8.t())
    out = acc.float() * (sx[:, None] * weight_scale[None, :])
    if bias is not None:
        out = out + bias.float()
    out = out.to(x.dtype)
    idx = outliers.nonzero().flatten()
    if idx.numel():
        w_cols = (weight_int8[:, idx].float() * weight_scale[:, None]).to(x.dtype)
        out = out + x2[:, idx] @ w_cols.t()
    return out.reshape(*shape[:-1], -1)


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """PEFT's LoRA forward: base(x) + lora_B(lora_A(dropout(x))) * scaling."""
    lora_in = F.dropout(x, dropout_p) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(lora_in, lora_a), lora_b) * scale
