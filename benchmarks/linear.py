"""Linear layer benchmark: y = x W^T + b for the F5 Llama MLP shape (4096 tokens, 512 -> 1408);
fwdbwd takes gradients for x, W and b.

fastpt: fastpt.ops.linear (its GEMM where it beats torch's BLAS: fp32 on non-Intel AVX-512
CPUs; otherwise F.linear itself); eager: F.linear (MKL); compile: F.linear under
torch.compile. fp32 only: bf16 products of more than 4 rows are F.linear in both. The
products alone, with their errors: python -m fastpt.benchmarks.linear_products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import linear


def make_inputs(shapes, dtype, requires_grad):
    x = torch.randn(shapes["x"], dtype=dtype, requires_grad=requires_grad)
    w = (torch.randn(shapes["w"]) / shapes["w"][1] ** 0.5).to(dtype).requires_grad_(requires_grad)
    bias = torch.randn(shapes["w"][0], dtype=dtype, requires_grad=requires_grad)
    return Inputs(args=(x, w, bias), grad=(0, 1, 2), bwd_reads=(0, 1))


def flops(shapes, mode):
    (m, k), (n, _) = shapes["x"], shapes["w"]
    return 2 * m * k * n * (1 if mode == "fwd" else 3)  # backward: grad x and grad W


SPEC = OpSpec(
    name="linear",
    shapes={"full": {"x": (4096, 512), "w": (1408, 512)}, "quick": {"x": (512, 512), "w": (1408, 512)}},
    make_inputs=make_inputs,
    fastpt=linear,
    eager=F.linear,
    dtypes=("fp32",),
    flops=flops,
)
