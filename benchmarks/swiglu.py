"""SwiGLU activation benchmark: silu(gate) * up on two (rows, ffn) tensors.

Minimal bytes: forward reads gate and up, writes the output; backward reads grad_out,
gate and up, writes grad_gate and grad_up.
"""

from __future__ import annotations

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import reference, swiglu


def make_inputs(shapes, dtype, requires_grad):
    gate = torch.randn(shapes["gate"], dtype=dtype, requires_grad=requires_grad)
    up = torch.randn(shapes["up"], dtype=dtype, requires_grad=requires_grad)
    return Inputs(args=(gate, up), grad=(0, 1), bwd_reads=(0, 1))


SPEC = OpSpec(
    name="swiglu",
    shapes={"full": {"gate": (4096, 8192), "up": (4096, 8192)},
            "quick": {"gate": (1024, 8192), "up": (1024, 8192)}},
    make_inputs=make_inputs,
    fastpt=swiglu,
    eager=reference.swiglu,
)
