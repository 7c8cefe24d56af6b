"""Attention benchmark: q, k, v (B, H, T, D), bidirectional (op ``attention``) and causal
(``attention_causal``), against naive eager attention (matmul, softmax, matmul), its
torch.compile, and PyTorch's own CPU flash kernel (F.scaled_dot_product_attention, ``sdpa``).

FLOPs: 4 B H T S D forward (two products), 2.5x that for the backward (five products), half
of both when causal. Peak memory is what one call takes through torch's allocator; fastpt's
kernel also holds, outside it, per thread a 128 x 512 fp32 logits tile plus a 128 x D
accumulator, a packed copy of k and v for bf16/fp16 forward (as SDPA does), and in the
backward (T + 2 S) x D fp32 accumulators: O(T D), never O(T S).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import attention

SHAPES = {
    "full": [{"q": (4, 8, 1024, 64)}, {"q": (1, 8, 4096, 64)}],
    "quick": {"q": (1, 4, 512, 64)},
}


def make_inputs(shapes, dtype, requires_grad):
    q, k, v = (torch.randn(shapes["q"], dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    return Inputs(args=(q, k, v), grad=(0, 1, 2), bwd_reads=(0, 1, 2))


def naive(q, k, v, causal: bool):
    """Textbook attention: materialises the (B, H, T, S) scores and probabilities."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        T, S = q.shape[-2], k.shape[-2]
        hidden = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def flops(shapes, mode, causal: bool):
    B, H, T, D = shapes["q"]
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


def spec(causal: bool) -> OpSpec:
    return OpSpec(
        name="attention_causal" if causal else "attention",
        shapes=SHAPES,
        make_inputs=make_inputs,
        fastpt=lambda q, k, v: attention(q, k, v, causal=causal),
        eager=lambda q, k, v: naive(q, k, v, causal),
        baselines={"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)},
        dtypes=("fp32", "bf16"),
        flops=lambda shapes, mode: flops(shapes, mode, causal),
        peak_memory=True,
    )


SPEC = spec(causal=False)
