"""RoPE benchmark: rotate-half rotary embedding of q (B, H, T, D) and k (B, Hkv, T, D)
(GQA: Hkv < H) with (T, D/2) cos/sin tables in the bench dtype, positions 0..T-1.

Minimal bytes: forward reads q, k, cos, sin and writes q_rot, k_rot; backward reads
grad_q_rot, grad_k_rot, cos and sin, writes grad_q and grad_k (the rotation is linear,
so it needs no saved activations).
"""

from __future__ import annotations

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import reference, rope


def make_inputs(shapes, dtype, requires_grad):
    q = torch.randn(shapes["q"], dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(shapes["k"], dtype=dtype, requires_grad=requires_grad)
    T, D = shapes["q"][-2:]
    cos, sin = reference.rope_tables(T, D, dtype=dtype)
    return Inputs(args=(q, k, cos, sin), grad=(0, 1), bwd_reads=(2, 3))


SPEC = OpSpec(
    name="rope",
    shapes={"full": {"q": (4, 32, 1024, 128), "k": (4, 8, 1024, 128)},
            "quick": {"q": (1, 32, 1024, 128), "k": (1, 8, 1024, 128)}},
    make_inputs=make_inputs,
    fastpt=rope,
    eager=reference.rope,
)
