"""Agreement checks shared by the model-level benchmarks (:mod:`fastpt.benchmarks.models`,
:mod:`fastpt.benchmarks.dropin`): before timing, each implementation's first call is compared
with a reference implementation's, within the tolerances below; one that disagrees is still
timed, and its ratios print as FAIL.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Mapping

import torch

from fastpt.benchmarks.harness import max_rel_error, rounding_floor

# Agreement tolerances, relative to max |reference| of each output (harness.max_rel_error).
# fp32: tests/tolerances.py holds each fp32 op to 1e-5 (forward) and 1e-4 (backward) of the
# float64 result; two fp32 implementations that each meet that differ by at most twice as
# much. "bwd" covers the training step's loss and gradients, "fwd" the encoder's output and
# decode's logits. (Measured on the full shapes: gradients 2-4e-6 apart, the loss 1e-7.)
FP32_TOL = {"fwd": 2e-5, "bwd": 2e-4}
# bf16 autocast: tests/tolerances.py's rule (FlashAttention's): an implementation's error
# against the exact result may be at most 2x eager PyTorch's at the same precision. The
# reference run once more in fp32 stands in for the exact result (its own error is ~1000x
# smaller than bf16's); see :func:`bf16_tolerance`.
LOW_PRECISION_FACTOR = 2.0


def autocast(dtype: str):
    """bf16 autocast on the CPU for "bf16", nothing for "fp32"."""
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_tolerance(reference, exact) -> float:
    """The tolerance of a bf16-autocast implementation's outputs against the reference's,
    from the reference's bf16 outputs and its fp32 ones (``exact``).

    With e = the reference's own bf16 error (max_rel_error against its fp32 run), an
    implementation within LOW_PRECISION_FACTOR x e of the exact result is within
    (LOW_PRECISION_FACTOR + 1) x e of the reference's bf16 outputs (triangle inequality): the
    tolerance, never below bf16's rounding (2 x eps, harness.rounding_floor). Measured on the
    full training step: e = 0.017, fastpt and transformers 0.016 from the reference.
    """
    e = max_rel_error(reference, exact)
    return rounding_floor((LOW_PRECISION_FACTOR + 1) * e if e is not None else 0.0, torch.bfloat16)


def tensor_compare(tol: float | Callable[[tuple], float]):
    """compare(got, ref) -> (max_rel_error, tolerance); ``tol``: a number or ref -> number."""
    def compare(got, ref):
        return max_rel_error(got, ref), tol(ref) if callable(tol) else tol
    return compare


def check_first_calls(first: Mapping[str, Callable[[], tuple]], reference: str,
                      compare: Callable[[tuple, tuple], tuple], label: str, catch: bool = False
                      ) -> tuple[dict[str, tuple[bool, float | None]], dict[str, str]]:
    """Run each implementation's first call (the reference's first) and compare what it returns
    with the reference's: ``compare(got, ref) -> (error, tolerance)``; agreement is
    ``error <= tolerance`` (None, a missing or misshapen output, disagrees).

    Returns ({impl: (agrees, error)} for every impl but the reference, {impl: error message}
    for the calls that raised, with ``catch``; without it an exception propagates). A
    disagreement also warns; the caller times the impl anyway and prints its ratios as FAIL.
    """
    agreement, failed = {}, {}

    def run(name):
        if not catch:
            return first[name]()
        try:
            return first[name]()
        except Exception as e:  # noqa: BLE001  (reported in the table)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            return None

    ref = run(reference)
    for name in first:
        if name == reference:
            continue
        got = run(name)
        if name in failed or reference in failed:
            continue
        err, tol = compare(got, ref)
        ok = err is not None and err <= tol
        if not ok:
            warnings.warn(f"{label}: {name} differs from {reference} (max relative error {err}, tolerance "
                          f"{tol:.3g}); timing it anyway, its ratios print as FAIL", stacklevel=2)
        agreement[name] = (ok, err)
        del got
    return agreement, failed


def param_grads(model, names, rename: Mapping[str, str] | None = None) -> tuple:
    """The gradients of ``model``'s parameters in the order of ``names`` (None where it has
    none); ``rename`` maps the model's parameter names to those of ``names``."""
    grads = {(rename or {}).get(n, n): p.grad for n, p in model.named_parameters()}
    return tuple(grads.get(n) for n in names)


def hf_to_ours(config) -> dict[str, str]:
    """transformers parameter name -> fastpt's, for the families whose tensors map one to one."""
    from fastpt.models.hf import _entries
    return {e.hf: e.ours[0] for e in _entries(config) if len(e.ours) == 1}
