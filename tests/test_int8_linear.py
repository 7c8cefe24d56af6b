"""fastpt.nn.Int8Linear (LLM.int8): within the quantization error, outlier decomposition, dtypes,
gradients, state dicts, quantize_, bad input, empty and non-contiguous inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpt
from fastpt import ops
from fastpt.nn import Int8Linear
from fastpt.ops import reference_finetune as ref
from int8_util import rand_int8


# ---------------------------------------------------------------- Int8Linear (LLM.int8)

def expected_error_bound(x, w, threshold):
    """|LLM.int8(x, w) - x @ w.T| per output, from half a quantization step per element:
    sum_k |x_k| |dw_k| + |w_k| |dx_k| (dx = 0 on outlier columns)."""
    x, w = x.double(), w.double()
    outl = (x.abs() > threshold).any(0)
    sx = x.masked_fill(outl, 0).abs().amax(1) / 127
    sw = w.abs().amax(1) / 127
    dx = (sx[:, None] / 2).expand_as(x).masked_fill(outl, 0)
    return x.abs() @ (sw[:, None] / 2).expand_as(w).T + dx @ (w.abs() + sw[:, None] / 2).T


@pytest.mark.parametrize("m, k, n", [(1, 16, 8), (7, 13, 5), (97, 130, 70), (40, 300, 33)])
def test_int8_linear_within_quantization_error(cpu_capability, m, k, n):
    lin = nn.Linear(k, n)
    x = torch.randn(m, k)
    x[:, 3 % k] *= 20  # an outlier feature, as in LLM activations
    layer = Int8Linear.from_linear(lin)
    out = layer(x)
    with torch.no_grad():
        exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    bound = expected_error_bound(x, lin.weight.detach(), 6.0)
    assert ((out.double() - exact).abs() <= bound * 1.001 + 1e-5).all()
    # same as the eager LLM.int8 reference (float32 sums of different order)
    with torch.no_grad():
        eager = ref.int8_linear(x, layer.weight_int8, layer.weight_scale, layer.bias) if m > 16 else None
    if eager is not None:
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_outliers", [1, 3, 16, 17, 40])  # up to 16 in the GEMM's epilogue, more by addmm
def test_outlier_columns_are_exact_to_their_precision(n_outliers):
    lin = nn.Linear(200, 40, bias=False)
    layer = Int8Linear.from_linear(lin)
    x = torch.zeros(33, 200)
    cols = torch.randperm(200)[:n_outliers]
    x[:, cols] = torch.randn(33, n_outliers) * 50  # only outlier columns are non-zero
    w_deq = layer.dequantized_weight()
    torch.testing.assert_close(layer(x), x @ w_deq.T, rtol=1e-6, atol=1e-5)


def test_decomposition_reduces_error():
    torch.manual_seed(1)
    lin = nn.Linear(512, 64, bias=False)
    x = torch.randn(64, 512)
    x[:, 10] = 80.0
    exact = F.linear(x, lin.weight).detach()
    err = {t: (Int8Linear.from_linear(lin, threshold=t)(x) - exact).abs().max().item() for t in (6.0, math.inf)}
    assert err[6.0] < err[math.inf] / 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_low_precision_input(dtype):
    lin = nn.Linear(130, 70)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(2, 20, 130)
    x[..., 0] = 9.0
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 20, 70)
    torch.testing.assert_close(out.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_int8_linear_rejects_a_non_contiguous_packed_weight():
    """The GEMM reads the packed panels by pointer: another layout of the same values must be
    refused, not read as if it were contiguous."""
    w, x = torch.randn(20, 70), torch.randn(4, 70)
    qw, sw = ops.quantize_weight(w)
    packed, colsum = ops.pack_int8_weight(qw)
    strided = packed.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(strided, packed)
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.int8_linear(x, strided, colsum, sw, 20)
    with pytest.raises(ValueError, match="must be contiguous"):
        ops.int8_linear(x, packed, torch.stack([colsum, colsum], 1)[:, 0], sw, 20)


def test_int8_linear_nan_row_is_nan():
    layer = Int8Linear.from_linear(nn.Linear(64, 16))
    x = torch.randn(5, 64)
    x[2, 7] = float("nan")
    out = layer(x)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()


def test_int8_linear_weight_memory_is_a_quarter_of_fp32():
    lin = nn.Linear(4096, 1024)
    layer = Int8Linear.from_linear(lin)
    int8_bytes = sum(b.numel() * b.element_size() for b in (layer.weight_packed, layer.weight_colsum, layer.weight_scale))
    fp32_bytes = lin.weight.numel() * 4
    assert fp32_bytes / int8_bytes > 3.98
    assert not any(p.requires_grad for p in layer.parameters())


def test_int8_linear_gradient_flows_to_input_only():
    lin = nn.Linear(100, 30)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(3, 7, 100, requires_grad=True)
    g = torch.randn(3, 7, 30)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.dequantized_weight())
    assert layer.bias.grad is None
    layer.bias.requires_grad_(True)
    layer(x).backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)))


def test_int8_linear_opcheck_and_compile():
    layer = Int8Linear.from_linear(nn.Linear(70, 20))
    x = torch.randn(9, 70, requires_grad=True)
    args = (x, layer.weight_packed, layer.weight_colsum, layer.weight_scale, 20, layer.bias, 6.0)
    torch.library.opcheck(torch.ops.fastpt.int8_linear.default, args)
    f = torch.compile(lambda x: layer(x).square().sum(), fullgraph=True)
    out = f(x)
    (grad,) = torch.autograd.grad(out, x)
    (grad_ref,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(out, layer(x).square().sum())
    torch.testing.assert_close(grad, grad_ref)


def test_int8_linear_moves_and_keeps_scales_float32():
    layer = Int8Linear.from_linear(nn.Linear(32, 8)).to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_packed.dtype == torch.int8
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_int8_linear_state_dict_roundtrip():
    layer = Int8Linear.from_linear(nn.Linear(40, 24))
    other = Int8Linear(40, 24)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(5, 40)
    assert torch.equal(other(x), layer(x))
    # 40 and 60 pack into the same 64 columns: the 60-column layer loaded the 40-column weight
    # and ran its last 20 inputs on zero weights, without a word
    with pytest.raises(RuntimeError, match=r"int8 weight of \(out, in\) = \(24, 40\) into an Int8Linear of \(24, 60\)"):
        Int8Linear(60, 24).load_state_dict(layer.state_dict())
    legacy = {k: v for k, v in layer.state_dict().items() if k != "weight_shape"}  # saved before the check
    older = Int8Linear(40, 24)
    older.load_state_dict(legacy)
    assert torch.equal(older(x), layer(x))


def test_quantize_swaps_linears():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 4)))
    x = torch.randn(3, 16)
    before = model(x)
    fastpt.quantize_(model, filter_fn=lambda m, name: name != "2.1")
    assert isinstance(model[0], Int8Linear) and isinstance(model[2][0], Int8Linear)
    assert isinstance(model[2][1], nn.Linear) and not isinstance(model[2][1], Int8Linear)
    torch.testing.assert_close(model(x), before, rtol=0.05, atol=0.05)


def test_threshold_and_scale_of_the_wrong_kind_are_named():
    with pytest.raises(TypeError, match="threshold must be a number, got str"):
        Int8Linear.from_linear(nn.Linear(8, 4), threshold="6")  # was "must be > 0, got 6"
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"scale must be \(4,\), one per output row, got \(\)"):
        layer.load_int8_weight(layer.weight_int8, torch.tensor(0.5))  # was broadcast silently


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold must be > 0"):
        Int8Linear.from_linear(nn.Linear(8, 4), threshold=threshold)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        fastpt.quantize_(nn.Sequential(nn.Linear(8, 4)), threshold=threshold)
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        ops.int8_linear(torch.randn(2, 8), layer.weight_packed, layer.weight_colsum, layer.weight_scale, 4,
                        None, threshold)


def test_int8_linear_bad_input():
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    for cols in (100, 16):  # 16: within the packing's 64-column block, so only the module can tell
        with pytest.raises(ValueError, match="in_features = 8"):
            layer(torch.randn(2, cols))
    with pytest.raises(ValueError, match="does x's last dim match"):  # the op, past the block
        ops.int8_linear(torch.randn(2, 100), layer.weight_packed, layer.weight_colsum, layer.weight_scale, 4)
    with pytest.raises(TypeError, match="x must be float32"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="from_linear needs an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))
    bad = nn.Linear(8, 4)
    bad.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int8Linear.from_linear(bad)


def test_empty_and_non_contiguous_inputs():
    layer = Int8Linear.from_linear(nn.Linear(16, 5))
    assert layer(torch.randn(0, 16)).shape == (0, 5) and layer(torch.randn(2, 0, 16)).shape == (2, 0, 5)
    xt = torch.randn(16, 40).t()
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()))
    a, b = rand_int8(30, 50), rand_int8(20, 50)
    assert torch.equal(ops.int8_matmul(a[:, ::2], b[:, ::2]), ref.int8_matmul(a[:, ::2], b[:, ::2]))
    assert ops.int8_matmul(rand_int8(0, 8), rand_int8(3, 8)).shape == (0, 3)
    out = ops.int8_matmul(rand_int8(2, 0), rand_int8(3, 0), torch.ones(2), torch.ones(3), bias=torch.ones(3))
    assert torch.equal(out, torch.ones(2, 3))
