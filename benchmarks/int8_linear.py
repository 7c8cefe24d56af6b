"""Int8Linear (LLM.int8) forward on x (M, K) against a K -> N layer with 0.1% outlier input
features (|x| > 6), in the bench dtype.

eager: F.linear with the float weight in the bench dtype (the layer Int8Linear replaces);
compile: the same under torch.compile; baseline ``llm_int8_eager``: the LLM.int8
decomposition in eager PyTorch with torch._int_mm (fastpt.ops.reference_finetune).
The int8 weight takes 1 byte per element against 4 (fp32) or 2 (bf16). Minimal bytes
(:func:`nbytes`) count what the int8 path moves: x, packed W, colsum, scale, bias, output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.nn import Int8Linear
from fastpt.ops import int8_linear, reference_finetune

OUTLIER_FRACTION = 0.001


def make_inputs(shapes, dtype, requires_grad):
    (m, k), (n, _) = shapes["x"], shapes["w"]
    lin = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    cols = torch.randperm(k)[: max(1, int(k * OUTLIER_FRACTION))]
    x[:, cols] *= 20  # outlier features, as in LLM activations
    layer = Int8Linear.from_linear(lin)
    w, b = lin.weight.detach().to(dtype), lin.bias.detach().to(dtype)
    return Inputs(args=(x.to(dtype), w, b, layer.weight_packed, layer.weight_colsum, layer.weight_scale,
                        layer.weight_int8))


def nbytes(inputs, outputs, mode):
    """Minimal bytes of the int8 path: x, the packed int8 weight, its column sums and scales,
    the bias and the output (not the float weight or the unpacked int8 copy in ``args``,
    which fastpt never reads)."""
    x, _, b, packed, colsum, scale, _ = inputs.args
    return sum(t.numel() * t.element_size() for t in (x, packed, colsum, scale, b, *outputs))


def fastpt(x, w, b, packed, colsum, scale, w_int8):
    return int8_linear(x, packed, colsum, scale, w.shape[0], b)


def eager(x, w, b, *rest):
    return F.linear(x, w, b)


def llm_int8_eager(x, w, b, packed, colsum, scale, w_int8):
    return reference_finetune.int8_linear(x, w_int8, scale, b)


SPEC = OpSpec(
    name="int8_linear",
    shapes={"full": {"x": (4096, 4096), "w": (4096, 4096)}, "quick": {"x": (1024, 1024), "w": (1024, 1024)}},
    make_inputs=make_inputs,
    fastpt=fastpt,
    eager=eager,
    baselines={"llm_int8_eager": llm_int8_eager},
    dtypes=("fp32", "bf16"),
    modes=("fwd",),
    peak_memory=True,
    nbytes=nbytes,
    # Against the float layer: int8 quantization error (measured ~5e-3 relative to max |y|).
    agree_tol={"fastpt": 5e-2, "llm_int8_eager": 5e-2},
    # fastpt against the eager LLM.int8 decomposition, the same computation: tight (fp32
    # rounding; the harness raises it to bf16's rounding, 2 x eps, for bf16).
    agree_also={"fastpt": ("llm_int8_eager", 1e-5)},
)
