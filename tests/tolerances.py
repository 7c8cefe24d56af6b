"""The one tolerance table every test uses (DESIGN.md, "Numbers we hold ourselves to").

float32 / float64: relative error against the float64 reference, forward and backward,
relative to the largest reference value; where the result cancels to ~0 (e.g. RMSNorm's
input gradient over one feature) no fp32 code can meet that, so the bound is then 2x the
error of eager PyTorch in the same dtype, when the test gives it.
bfloat16 / float16: FlashAttention's rule: the error against the float64 reference may be
at most 2x the error of eager PyTorch computing the same thing at the same precision
(plus one unit in the last place of the largest value, for exactly-representable outputs).
"""

from __future__ import annotations

import torch

RTOL = {
    "fwd": {torch.float32: 1e-5, torch.float64: 1e-12},
    "bwd": {torch.float32: 1e-4, torch.float64: 1e-10},
}
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_FACTOR = 2.0


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).abs()
    # NaN/Inf must sit in the same places; compare the finite values.
    both = torch.isfinite(ref)
    return float(diff[both].max()) if both.any() else 0.0


def assert_close(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, kind: str = "fwd",
                 eager: torch.Tensor | None = None, what: str = "output") -> None:
    """Check ``out`` (computed in ``dtype``) against the float64 reference ``ref64``.

    ``eager`` is eager PyTorch's result in ``dtype``; required for bfloat16/float16.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.equal(torch.isnan(out), torch.isnan(ref64)), f"{what}: NaN positions differ"
    finite = torch.isfinite(ref64)
    assert torch.equal(out[~finite].double(), ref64[~finite]) if (~finite).any() else True, \
        f"{what}: non-finite values differ"
    if out.numel() == 0:
        return
    scale = float(ref64[finite].abs().max()) if finite.any() else 0.0
    err = _max_err(out, ref64)
    if dtype in LOW_PRECISION:
        assert eager is not None, "low-precision checks need eager PyTorch's result"
        bound = LOW_PRECISION_FACTOR * _max_err(eager, ref64) + torch.finfo(dtype).eps * scale
        assert err <= bound, f"{what}: {dtype} error {err:.3g} > 2x eager error bound {bound:.3g}"
    else:
        rtol = RTOL[kind][dtype]
        bound = rtol * max(scale, 1e-30)
        if eager is not None:
            bound = max(bound, LOW_PRECISION_FACTOR * _max_err(eager, ref64))
        if dtype == torch.float64:  # float64 "eager" is the reference itself: allow a few ulps
            bound = max(bound, 4 * torch.finfo(dtype).eps)
        assert err <= bound, \
            f"{what}: {dtype} max error {err:.3g} > bound {bound:.3g} ({rtol:g} x max|ref| = {scale:.3g})"
