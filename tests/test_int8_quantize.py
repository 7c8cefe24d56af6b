"""Row-wise int8 quantization, outlier columns and int8 weight packing against the reference, with
special and tiny rows, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch

from fastpt import ops
from fastpt.ops import reference_finetune as ref
from int8_util import rand_int8


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 7, 64, 100, 1025])
def test_quantize_rowwise_matches_reference(cpu_capability, dtype, cols):
    x = (torch.randn(13, cols) * torch.logspace(-3, 2, 13)[:, None]).to(dtype)
    q, scale = ops.quantize_rowwise(x)
    q_ref, scale_ref = ref.quantize_rowwise(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)
    assert q.abs().max() <= 127
    # error bound: half a quantization step per element
    err = (ops.dequantize_rowwise(q, scale).double() - x.double()).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 1e-5)).all()


def test_quantize_skip_columns_and_special_rows(cpu_capability):
    x = torch.randn(4, 70)
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 9] = 50.0
    skip = torch.zeros(70, dtype=torch.bool)
    skip[9] = True
    q, scale = ops.quantize_rowwise(x, skip)
    assert scale[0] == 0 and (q[0] == 0).all()
    assert scale[1].isnan() and (q[1] == 0).all()
    assert scale[2].isnan() and (q[2] == 0).all()
    assert q[3, 9] == 0 and torch.equal(scale[3], x[3].masked_fill(skip, 0).abs().max() / 127)
    q_ref, s_ref = ref.quantize_rowwise(x[3:], skip)
    assert torch.equal(q[3:], q_ref) and torch.equal(scale[3:], s_ref)


def test_quantize_tiny_rows(cpu_capability):
    """Rows whose absmax is so small that 127 / absmax overflows float32 (< ~3.7e-37, subnormals
    included) still quantize to round(x / scale) with the signs kept, as the reference does."""
    x = torch.randn(6, 70).clamp(-3, 3) * torch.tensor([1e-37, 1e-39, 1e-41, 1e-20, 1.0, 3e-38])[:, None]
    x[0, :2] = torch.tensor([4e-37, -4e-37])  # the row's absmax, once with each sign
    q, scale = ops.quantize_rowwise(x)
    q_ref, scale_ref = ref.quantize_rowwise(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q[0, 0] == 127 and q[0, 1] == -127 and q.abs().max() <= 127
    want = torch.round(x.double() / scale.double()[:, None]).clamp(-127, 127)
    assert (q.double() - want).abs().max() <= 1  # a float32 rounding from the float64 quotient


def test_quantize_weight_per_output_channel():
    w = torch.randn(8, 33) * torch.arange(1, 9)[:, None]
    q, scale = ops.quantize_weight(w)
    assert scale.shape == (8,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    with pytest.raises(ValueError, match="2-D"):
        ops.quantize_weight(torch.randn(3))


def test_outlier_columns(cpu_capability):
    x = torch.randn(50, 300)
    x[7, 11] = 6.5
    x[40, 299] = -100.0
    x[3, 12] = 6.0  # not > threshold
    x[5, 13] = float("nan")  # NaN is not an outlier
    mask = ops.outlier_columns(x)
    assert mask.dtype == torch.bool and mask.shape == (300,)
    assert mask.nonzero().flatten().tolist() == [11, 299]
    assert torch.equal(ops.outlier_columns(x.bfloat16(), 2.5), (x.bfloat16().float().abs() > 2.5).any(0))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        ops.outlier_columns(x, 0.0)


def test_pack_roundtrip_and_layout():
    w = rand_int8(45, 70)
    packed, colsum = ops.pack_int8_weight(w)
    assert packed.shape == (4, 32, 16, 4) and colsum.shape == (64,)
    assert torch.equal(ops.unpack_int8_weight(packed, 45, 70), w)
    assert torch.equal(colsum[:45], w.sum(1, dtype=torch.int32)) and (colsum[45:] == 0).all()
    assert packed[1, 2, 3, 1] == w[16 + 3, 4 * 2 + 1]  # [n // 16][k // 4][n % 16][k % 4]


def test_quantize_opcheck():
    x = torch.randn(6, 50)
    skip = torch.zeros(50, dtype=torch.bool)
    skip[3] = True
    torch.library.opcheck(torch.ops.fastpt.quantize_rowwise.default, (x, skip))
    torch.library.opcheck(torch.ops.fastpt.quantize_rowwise.default, (x.bfloat16(), None))
    torch.library.opcheck(torch.ops.fastpt.outlier_columns.default, (x, 1.0))
    torch.library.opcheck(torch.ops.fastpt.pack_int8_weight.default, (rand_int8(20, 30),))
    torch.library.opcheck(torch.ops.fastpt.unpack_int8_weight.default, (ops.pack_int8_weight(rand_int8(20, 30))[0], 20, 30))


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="x must be float32"):
        ops.quantize_rowwise(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="skip_cols must have shape"):
        ops.quantize_rowwise(torch.ones(3, 4), torch.zeros(3, dtype=torch.bool))
