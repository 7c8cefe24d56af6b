"""Int8 quantization, int8_matmul (every CPU path), Int8Linear (LLM.int8) and quantize_."""

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

PATHS = fastpt._C.int8_matmul_paths()
SHAPES = [(1, 1, 1), (7, 13, 5), (33, 70, 65), (97, 130, 300), (64, 64, 128), (5, 200, 1025)]


@pytest.fixture(params=["amx", "vnni", "avx2", "scalar"])
def int8_path(request):
    """Runs a test on each int8 GEMM path this machine has."""
    if request.param not in PATHS:
        pytest.skip(f"this machine has no {request.param} int8 path (has: {PATHS})")
    fastpt._C.set_int8_matmul_path(request.param)
    assert fastpt._C.int8_matmul_path() == request.param
    yield request.param
    fastpt._C.set_int8_matmul_path("auto")


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


# ---------------------------------------------------------------- int8_matmul

@pytest.mark.parametrize("m, k, n", SHAPES)
def test_exact_int32_sums_every_path(int8_path, m, k, n):
    a, b = rand_int8(m, k), rand_int8(n, k)
    assert torch.equal(ops.int8_matmul(a, b), ref.int8_matmul(a, b))


def test_extreme_values_do_not_overflow(int8_path):
    k = 4096  # 4096 * 128 * 128 = 2^26 per sum: far from int32's limit, and exact
    a = torch.full((40, k), -128, dtype=torch.int8)
    b = torch.cat([torch.full((20, k), -128, dtype=torch.int8), torch.full((20, k), 127, dtype=torch.int8)])
    out = ops.int8_matmul(a, b)
    assert torch.equal(out, ref.int8_matmul(a, b))
    assert out[0, 0] == 128 * 128 * k and out[0, 30] == -128 * 127 * k


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_epilogue(cpu_capability, out_dtype, bias):
    m, k, n = 37, 100, 70
    a, b = rand_int8(m, k), rand_int8(n, k)
    sa, sb = torch.rand(m) / 100, torch.rand(n) / 100
    bias_t = torch.randn(n) if bias else None
    out = ops.int8_matmul(a, b, sa, sb, out_dtype, bias_t)
    expect = ref.int8_matmul(a, b, sa, sb, torch.float64, bias_t)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # float32 epilogue: a few ulps; then one rounding to out_dtype
    rtol = 4 * torch.finfo(torch.float32).eps + torch.finfo(out_dtype).eps
    assert ((out.double() - expect).abs() <= rtol * expect.abs() + 1e-6).all()


def test_paths_agree_and_are_reported():
    assert PATHS[-1] == "scalar" and fastpt._C.int8_matmul_path() == PATHS[0]
    a, b = rand_int8(50, 300), rand_int8(40, 300)
    results = []
    for path in PATHS:
        fastpt._C.set_int8_matmul_path(path)
        results.append(ops.int8_matmul(a, b))
    fastpt._C.set_int8_matmul_path("auto")
    assert all(torch.equal(r, results[0]) for r in results)


def test_kernel_build_caps_the_path(cpu_capability):
    expected = {"DEFAULT": "scalar", "AVX2": "avx2"}.get(cpu_capability, PATHS[0])
    assert fastpt._C.int8_matmul_path() == expected


def test_bad_path_name():
    with pytest.raises(ValueError, match="int8 path must be"):
        fastpt._C.set_int8_matmul_path("sse")


@pytest.mark.parametrize(
    "a, b, kwargs, error, match",
    [
        (torch.ones(4, 8), torch.ones(3, 8, dtype=torch.int8), {}, TypeError, "a must be int8"),
        (rand_int8(4, 8), torch.ones(3, 8), {}, TypeError, "b must be int8"),
        (rand_int8(4, 8), rand_int8(3, 7), {}, ValueError, "same inner dim"),
        (rand_int8(4, 8, 2), rand_int8(3, 8), {}, ValueError, "a must be 2-D"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4)}, ValueError, "scale_b is required"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4), "scale_b": torch.ones(2)},
         ValueError, "scale_b must have shape"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4, dtype=torch.float64),
                                            "scale_b": torch.ones(3)}, TypeError, "scale_a must be float32"),
        (rand_int8(4, 8), rand_int8(3, 8), {"scale_a": torch.ones(4), "scale_b": torch.ones(3),
                                            "out_dtype": torch.int32}, ValueError, "exact integer sums"),
    ],
)
def test_int8_matmul_bad_input(a, b, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.int8_matmul(a, b, **kwargs)


def test_int8_matmul_opcheck_and_compile():
    a, b = rand_int8(33, 70), rand_int8(20, 70)
    sa, sb = torch.rand(33), torch.rand(20)
    torch.library.opcheck(torch.ops.fastpt.int8_matmul.default, (a, b, None, None, None, None))
    torch.library.opcheck(torch.ops.fastpt.int8_matmul.default, (a, b, sa, sb, torch.bfloat16, torch.randn(20)))
    f = torch.compile(lambda a, b: ops.int8_matmul(a, b, sa, sb), fullgraph=True)
    torch.testing.assert_close(f(a, b), ops.int8_matmul(a, b, sa, sb))


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
