"""Int8 GEMM benchmark: a (M, K) int8 x b (N, K) int8 with the dequantization epilogue
(row scales of a, channel scales of b) to the bench dtype.

eager: torch._int_mm (oneDNN) then the scaling in eager PyTorch; compile: the same under
torch.compile (inductor fuses the scaling); baseline ``int_mm``: torch._int_mm alone (the
raw integer GEMM, int32 out; timed, not checked against eager). fastpt packs b on every call here; Int8Linear packs once.
"""

from __future__ import annotations

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.ops import int8_matmul


def make_inputs(shapes, dtype, requires_grad):
    a = torch.randint(-128, 128, shapes["a"], dtype=torch.int8)
    b = torch.randint(-128, 128, shapes["b"], dtype=torch.int8)
    scale_a, scale_b = torch.rand(a.shape[0]) / 1e4, torch.rand(b.shape[0]) / 1e4
    return Inputs(args=(a, b, scale_a, scale_b, dtype))


def fastpt(a, b, scale_a, scale_b, dtype):
    return int8_matmul(a, b, scale_a, scale_b, dtype)


def eager(a, b, scale_a, scale_b, dtype):
    return (torch._int_mm(a, b.t()).float() * (scale_a[:, None] * scale_b[None, :])).to(dtype)


SPEC = OpSpec(
    name="int8_matmul",
    shapes={"full": {"a": (2048, 2048), "b": (2048, 2048)}, "quick": {"a": (512, 512), "b": (512, 512)}},
    make_inputs=make_inputs,
    fastpt=fastpt,
    eager=eager,
    baselines={"int_mm": lambda a, b, *rest: torch._int_mm(a, b.t())},
    dtypes=("fp32", "bf16"),
    modes=("fwd",),
    # fastpt and eager compute the same exact int32 product and the same scaling: they agree
    # to fp32 rounding (for bf16 output the harness raises it to bf16's rounding, 2 x eps).
    agree_tol=1e-5,
    raw=("int_mm",),  # int32 product before the scaling, by design
)
