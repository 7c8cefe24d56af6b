"""RMSNorm benchmark: x (rows, hidden) normalised and scaled by weight (hidden,).

Minimal bytes: forward reads x and weight, writes y; backward reads grad_y, x and weight,
writes grad_x and grad_weight (the per-row rstd is a rounding error at these sizes).
"""

from __future__ import annotations

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import reference, rms_norm

EPS = 1e-6


def make_inputs(shapes, dtype, requires_grad):
    x = torch.randn(shapes["x"], dtype=dtype, requires_grad=requires_grad)
    weight = (1 + 0.1 * torch.randn(shapes["x"][-1])).to(dtype).requires_grad_(requires_grad)
    return Inputs(args=(x, weight, EPS), grad=(0, 1), bwd_reads=(0, 1))


SPEC = OpSpec(
    name="rms_norm",
    shapes={"full": {"x": (4096, 4096)}, "quick": {"x": (1024, 4096)}},
    make_inputs=make_inputs,
    fastpt=rms_norm,
    eager=reference.rms_norm,
)
