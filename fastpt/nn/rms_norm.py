"""RMSNorm module: a drop-in for torch.nn.RMSNorm and HF LlamaRMSNorm (same constructor
arguments and state-dict key ``weight``)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fastpt.ops import reference
from fastpt.ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x**2) + eps) * weight over the trailing ``normalized_shape`` dims.

    Args:
        normalized_shape: int or tuple, the trailing dims to normalise over.
        eps: added to the mean square; None means ``torch.finfo(x.dtype).eps`` (as torch).
        elementwise_affine: learn a weight (initialised to ones); False means no weight.
        use_fused: False runs the pure-PyTorch reference instead (for A/B checks).
    """

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None, use_fused: bool = True):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive finite number or None, got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.use_fused = use_fused
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def variance_epsilon(self) -> float | None:  # HF LlamaRMSNorm's name for eps
        return self.eps

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"RMSNorm over {self.normalized_shape} got input of shape {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        n = math.prod(self.normalized_shape)
        weight = self.weight.reshape(n) if self.weight is not None else x.new_ones(n)
        flat = x.reshape(*x.shape[: x.dim() - k], n)
        if self.use_fused:
            y = rms_norm(flat, weight.to(x.dtype), eps)
        else:
            y = reference.rms_norm(flat, weight.to(x.dtype), eps)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
