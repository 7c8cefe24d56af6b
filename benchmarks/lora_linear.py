"""LoRA linear benchmark: x (M, K) through a frozen K -> N weight plus a rank-r update,
out = x W^T + bias + 2 (x A^T) B^T; fwdbwd takes gradients for x, A and B.

eager: PEFT's formula in eager PyTorch (fastpt.ops.reference_finetune.lora_linear);
compile: the same under torch.compile. Peak memory per call is recorded.
"""

from __future__ import annotations

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import lora_linear, reference_finetune

SCALE = 2.0


def make_inputs(shapes, dtype, requires_grad):
    (n, k), (r, _) = shapes["w"], shapes["a"]
    x = torch.randn(shapes["x"], dtype=dtype, requires_grad=requires_grad)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    bias = torch.randn(n, dtype=dtype)
    a = (torch.randn(r, k) / k**0.5).to(dtype).requires_grad_(requires_grad)
    b = (torch.randn(n, r) / r**0.5).to(dtype).requires_grad_(requires_grad)
    return Inputs(args=(x, w, a, b, bias), grad=(0, 2, 3), bwd_reads=(0, 1, 2, 3))


def fastpt(x, w, a, b, bias):
    return lora_linear(x, w, a, b, SCALE, bias)


def eager(x, w, a, b, bias):
    return reference_finetune.lora_linear(x, w, a, b, SCALE, bias)


SPEC = OpSpec(
    name="lora_linear",
    shapes={"full": {"x": (4096, 4096), "w": (4096, 4096), "a": (16, 4096), "b": (4096, 16)},
            "quick": {"x": (1024, 1024), "w": (1024, 1024), "a": (16, 1024), "b": (1024, 16)}},
    make_inputs=make_inputs,
    fastpt=fastpt,
    eager=eager,
    dtypes=("fp32", "bf16"),
    peak_memory=True,
)
