"""RMSNorm module: a drop-in for torch.nn.RMSNorm and HF LlamaRMSNorm / T5LayerNorm (same
constructor arguments, state-dict key ``weight``, ``eps`` / ``variance_epsilon``), and
:meth:`RMSNorm.from_module` to convert an existing module."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fastpt.ops import reference
from fastpt.ops.rms_norm import rms_norm


# Marks "eps not given": None is torch's default (finfo eps), 1e-6 LlamaRMSNorm's.
class _DefaultEps:
    def __repr__(self) -> str:
        return "default"


_DEFAULT_EPS = _DefaultEps()


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x**2) + eps) * weight over the trailing ``normalized_shape`` dims.

    Constructor arguments of both originals: ``RMSNorm(normalized_shape, eps, elementwise_affine,
    device, dtype)`` as torch.nn.RMSNorm, ``RMSNorm(hidden_size, eps)`` or
    ``RMSNorm(hidden_size=..., eps=...)`` as LlamaRMSNorm. The default eps is torch's, None
    (``torch.finfo`` of x's compute type: float32 for bf16 / fp16), so ``RMSNorm(16)`` matches
    ``torch.nn.RMSNorm(16)``; with
    the HF keyword ``hidden_size=`` it is HF's, 1e-6 (pass eps to be explicit).

    Args:
        normalized_shape: int or tuple, the trailing dims to normalise over (alias ``hidden_size``).
        eps: added to the mean square, >= 0; None means the float32 eps for bf16 / fp16 /
            float32 inputs and float64's for float64 (as torch computes it). 0 is accepted as
            torch accepts it: fastpt's kernel needs eps > 0, so eps 0 runs the PyTorch formula
            (``fastpt.ops.reference.rms_norm``), and an all-zero row gives NaN as torch's does.
        elementwise_affine: learn a weight (initialised to ones); False means no weight.
        use_fused: False runs the pure-PyTorch reference instead (for A/B checks).

    Raises:
        TypeError: both or neither of ``normalized_shape`` and ``hidden_size`` given.
        TypeError: eps not a real number (or None).
        ValueError: eps negative, NaN or infinite.
    """

    def __init__(self, normalized_shape=None, eps: float | None = _DEFAULT_EPS, elementwise_affine: bool = True,
                 device=None, dtype=None, use_fused: bool = True, *, hidden_size=None):
        super().__init__()
        if (normalized_shape is None) == (hidden_size is None):
            raise TypeError("RMSNorm takes normalized_shape (torch) or hidden_size (HF), exactly one of them")
        if eps is _DEFAULT_EPS:  # torch.nn.RMSNorm's default, or LlamaRMSNorm's with hidden_size=
            eps = None if hidden_size is None else 1e-6
        if normalized_shape is None:
            normalized_shape = hidden_size
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        if eps is not None and not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a number or None, got {type(eps).__name__}")
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0 or None, got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.use_fused = use_fused
        # With a weight of another dtype than x: HF's LlamaRMSNorm returns the promoted dtype
        # (normed x in x's dtype times the weight), torch.nn.RMSNorm x's dtype. The HF-style
        # constructor (hidden_size=) and from_module of an HF norm take HF's.
        self.promotes_dtype = hidden_size is not None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The weight back to ones (as torch.nn.RMSNorm.reset_parameters)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    @property
    def variance_epsilon(self) -> float | None:  # HF LlamaRMSNorm's name for eps
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value: float | None) -> None:
        self.eps = value

    @classmethod
    def from_module(cls, module: nn.Module, use_fused: bool = True) -> "RMSNorm":
        """A fastpt RMSNorm with the shape, eps and a copy of the weight of ``module``: a
        torch.nn.RMSNorm, an HF LlamaRMSNorm-style module (``weight`` + ``variance_epsilon``,
        e.g. MistralRMSNorm, Qwen2RMSNorm, T5LayerNorm) or a fastpt RMSNorm.

        Raises:
            TypeError: ``module`` has neither ``normalized_shape``/``eps`` nor
                ``weight``/``variance_epsilon``.
        """
        promotes = isinstance(module, RMSNorm) and module.promotes_dtype
        if isinstance(module, (nn.RMSNorm, RMSNorm)):
            shape, eps, affine = module.normalized_shape, module.eps, module.elementwise_affine
        elif isinstance(getattr(module, "weight", None), Tensor) and hasattr(module, "variance_epsilon"):
            shape, eps, affine = tuple(module.weight.shape), module.variance_epsilon, True
            promotes = True
        else:
            raise TypeError(f"cannot convert {type(module).__name__} to RMSNorm: expected torch.nn.RMSNorm or a "
                            "module with weight and variance_epsilon (HF LlamaRMSNorm)")
        weight = getattr(module, "weight", None)
        out = cls(shape, eps=eps, elementwise_affine=affine, use_fused=use_fused,
                  device=weight.device if weight is not None else None,
                  dtype=weight.dtype if weight is not None else None)
        if weight is not None:
            with torch.no_grad():
                out.weight.copy_(weight)
        out.promotes_dtype = promotes
        return out

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"RMSNorm over {self.normalized_shape} got input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"RMSNorm needs a floating-point input, got {x.dtype}")
        # None: torch's default, the eps of the type it computes in (float32 for bf16 / fp16
        # inputs, not their own 7.8e-3 / 9.8e-4).
        eps = self.eps if self.eps is not None else torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        n = math.prod(self.normalized_shape)
        flat = x.reshape(*x.shape[: x.dim() - k], n)
        # eps 0 (torch.nn.RMSNorm allows it): the kernel requires eps > 0, PyTorch's formula does not.
        norm = rms_norm if self.use_fused and eps > 0 else reference.rms_norm
        if self.weight is None or self.weight.dtype == x.dtype or not getattr(self, "promotes_dtype", False):
            weight = self.weight.reshape(n).to(x.dtype) if self.weight is not None else x.new_ones(n)
            return norm(flat, weight, eps).reshape(x.shape)
        # HF's: a weight of another dtype (an fp32 norm in a bf16 model) times the normed x in
        # x's dtype, in the promoted dtype.
        return (norm(flat, x.new_ones(n), eps) * self.weight.reshape(n)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
