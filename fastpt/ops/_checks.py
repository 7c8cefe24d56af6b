"""Input checks for the fake kernels: the C++ glue checks real tensors, but a tensor on
another device (e.g. "meta") or under FakeTensorMode / torch.compile sends the call to the
fake kernel instead, so it checks too, mirroring the glue (csrc/common/glue.h and each op's
*_checks.h): same exception types (TypeError for dtypes, ValueError for shapes, devices and
arguments), same order, same messages. Values only a real tensor holds (labels or positions
in range, finite probabilities) are left to the real op."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# c10's names of the dtypes (what the C++ glue prints): torch.int32 -> "Int".
_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int",
              torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
              torch.complex128: "ComplexDouble"}

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as the C++ glue names it in messages ("Float", "Int", ...)."""
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def sizes(t: Tensor) -> str:
    """t's shape as the C++ glue prints it: [2, 5]."""
    return str(list(t.shape))


def num(x: float) -> str:
    """A float as the C++ glue prints it (ostream: 1, 0.1, 1e-06, nan, inf)."""
    return f"{x:g}"


def check_value(cond, message: Callable[[], str]) -> None:
    """ValueError(message()) unless cond (TORCH_CHECK_VALUE); cond may be symbolic."""
    torch._check_value(cond, message)


def check_type(cond, message: Callable[[], str]) -> None:
    """TypeError(message()) unless cond (TORCH_CHECK_TYPE)."""
    torch._check_type(cond, message)


def check_float(t: Tensor, name: str, allow_float64: bool = True) -> None:
    """TypeError unless t is float32 / bfloat16 / float16 (or float64 where allowed): glue.h's float_dtype."""
    ok = _FLOATS + ((torch.float64,) if allow_float64 else ())
    check_type(t.dtype in ok, lambda: f"{name} must be float32, bfloat16 or float16"
               f"{' (or float64)' if allow_float64 else ''}, got {dtype_name(t.dtype)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other float dtype (glue.h's compute_type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_dtype(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    check_type(t.dtype == ref.dtype, lambda: f"{name} must have the dtype of {ref_name} "
               f"({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}")


def check_same_shape(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    check_value(t.shape == ref.shape, lambda: f"{name} must have the shape of {ref_name} {sizes(ref)}, got {sizes(t)}")


def check_same_device(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    """ValueError naming the first of ``others`` that is not on ``ref``'s device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_dropout_seed(dropout_p: float, seed: Tensor | None, message: str) -> None:
    """ValueError(message) when dropout_p > 0 comes without a one-element int64 seed."""
    check_value(dropout_p == 0 or (seed is not None and seed.numel() == 1 and seed.dtype == torch.int64),
                lambda: message)
