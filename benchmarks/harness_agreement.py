"""Agreement before timing: each impl's outputs against eager's, within the spec's tolerance."""

from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch

from fastpt.benchmarks.harness_types import OpSpec

# Default agreement tolerance of every impl against eager, relative to max |eager| (the
# tests hold the real bar for fastpt; this catches a wrong kernel before it can win a table).
_AGREE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float64: 1e-9}


def agree_tolerance(spec: OpSpec, impl: str, dtype: torch.dtype) -> float:
    """The relative tolerance of ``impl`` against eager (see :class:`OpSpec`)."""
    tol = spec.agree_tol
    if isinstance(tol, Mapping):
        tol = tol.get(impl)
    if tol is None:
        tol = _AGREE_TOL[dtype]
    return rounding_floor(tol, dtype)


def rounding_floor(tol: float, dtype: torch.dtype) -> float:
    """``tol``, raised to the rounding of ``dtype`` (2 x its machine epsilon) where it is lower."""
    # Two results rounded to the output dtype independently differ by up to one ulp (eps x |y|)
    # even when their exact values agree; 2 x eps leaves room for the rest (bf16: ~1.6e-2).
    return max(tol, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else tol


def max_rel_error(got: tuple, ref: tuple) -> float | None:
    """Largest |got - ref| over every output, each relative to its max |ref|; None when
    the outputs differ in number or shape, or the error is not finite (a nan or inf)."""
    if len(got) != len(ref):
        return None
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        if not (isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor)) or g.shape != r.shape:
            return None
        if not r.numel():
            continue
        g, r = g.detach().double(), r.detach().double()
        scale = max(float(r.abs().max()), 1e-30)
        err = float((g - r).abs().max()) / scale
        if not math.isfinite(err):
            return None
        worst = max(worst, err)
    return worst


def _agrees(err: float | None, tol: float) -> bool:
    return err is not None and err <= tol


def _check_agreement(spec: OpSpec, dtype: torch.dtype, mode: str, impl: str, got: tuple,
                     refs: Mapping[str, tuple]) -> tuple[bool, float | None]:
    """``impl``'s outputs against eager (and its ``agree_also`` impl): (agrees, error vs
    eager). A disagreement also warns; the case is timed anyway."""
    err = max_rel_error(got, refs["eager"])
    tol = agree_tolerance(spec, impl, dtype)
    ok = _agrees(err, tol)
    problems = [] if ok else [f"eager (max relative error {err}, tolerance {tol:.3g})"]
    if impl in spec.agree_also:
        other, other_tol = spec.agree_also[impl]
        other_tol = rounding_floor(other_tol, dtype)
        other_err = max_rel_error(got, refs[other])
        if not _agrees(other_err, other_tol):
            ok = False
            problems.append(f"{other} (max relative error {other_err}, tolerance {other_tol:.3g})")
    if not ok:
        warnings.warn(f"{spec.name} {dtype} {mode}: {impl} differs from " + " and ".join(problems)
                      + "; timing it anyway, its ratios print as FAIL", stacklevel=3)
    return ok, err
