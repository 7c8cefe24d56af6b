"""fastpt.ops.gemm / fastpt.ops.linear against float64 and F.linear: every transpose case and
CPU kernel build, odd sizes, strided inputs, gradients, opcheck, compile, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastpt import ops
from fastpt.ops import _onednn

gemm_module = importlib.import_module("fastpt.ops.gemm")  # the module: fastpt.ops.gemm is the function


def operands(m, n, k, ta, tb, dtype=torch.float32):
    a = torch.randn(k, m) if ta else torch.randn(m, k)
    b = torch.randn(n, k) if tb else torch.randn(k, n)
    return a.to(dtype), b.to(dtype)


def product(a, b, ta, tb):
    return (a.t() if ta else a).double() @ (b.t() if tb else b).double()


def assert_fp32_close(out, ref, k):
    # fp32 accumulation over k terms: error ~ sqrt(k) eps |a||b| for random signs
    bound = 1e-6 * max(k, 1) ** 0.5 * ref.abs().max().clamp(min=1).item()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 37, 1000), (3, 70, 17), (4, 5, 16), (7, 33, 5), (8, 32, 16),
                                     (300, 129, 257), (513, 70, 1000)])
def test_matches_float64(cpu_capability, m, n, k, ta, tb):
    a, b = operands(m, n, k, ta, tb)
    out = ops.gemm(a, b, ta, tb)
    assert out.shape == (m, n) and out.dtype == torch.float32 and out.is_contiguous()
    assert_fp32_close(out, product(a, b, ta, tb), k)


@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m, n, k", [(1, 37, 1000), (3, 70, 17), (4, 129, 64), (40, 70, 33)])
def test_bfloat16_within_twice_torch_error(cpu_capability, m, n, k, tb):
    """bf16 inputs, fp32 accumulation, one rounding: the matrix-vector path (up to 4 rows of
    a against b^T) and the blocked products, against float64 and torch's own bf16 matmul."""
    a, b = operands(m, n, k, False, tb, torch.bfloat16)
    out = ops.gemm(a, b, False, tb)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    ref = product(a, b, False, tb)
    torch_err = ((a @ (b.t() if tb else b)).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-6 * ref.abs().max().item()


def test_linear_bf16_decoding_path_matches_autocast_f_linear():
    x, w = torch.randn(1, 1, 96), torch.randn(50, 96).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_module.gemm_dtype(x, w) == (torch.bfloat16 if gemm_module.own_kernel_active() else None)
        got, want = ops.linear(x, w), F.linear(x, w)
    assert got.dtype == want.dtype == torch.bfloat16
    # fp32 sums in another order, each rounded once to bf16: within a unit in the last place
    assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


def test_strided_inputs_are_read_in_place_or_copied():
    big = torch.randn(40, 90)
    a = big[3:20, 5:60]            # row stride 90 > 55 columns
    b = torch.randn(70, 55).t()    # column-major: read as the other layout
    c = torch.randn(55, 30, 2)[:, :, 0]   # no unit stride: copied
    assert_fp32_close(ops.gemm(a, b), a.double() @ b.double(), 55)
    assert_fp32_close(ops.gemm(a, c), a.double() @ c.double(), 55)
    assert_fp32_close(ops.gemm(b, a, True, True), b.t().double() @ a.t().double(), 70)


def test_empty_and_zero_inner_dimension():
    assert ops.gemm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
    out = ops.gemm(torch.randn(5, 0), torch.randn(0, 3))
    assert out.shape == (5, 3) and torch.equal(out, torch.zeros(5, 3))


@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
def test_gradcheck(ta, tb):
    a, b = operands(6, 5, 7, ta, tb, torch.float64)
    a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ops.gemm(x, y, ta, tb), (a, b))


@pytest.mark.parametrize("ta, tb", [(False, True), (True, False)])
def test_fp32_gradients_match_float64(ta, tb):
    a, b = operands(65, 40, 300, ta, tb)
    g = torch.randn(65, 40)
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ops.gemm(a32, b32, ta, tb).backward(g)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ((a64.t() if ta else a64) @ (b64.t() if tb else b64)).backward(g.double())
    assert_fp32_close(a32.grad, a64.grad, 40)
    assert_fp32_close(b32.grad, b64.grad, 65)


def test_opcheck():
    for ta, tb in [(False, True), (True, False)]:
        a, b = operands(9, 6, 11, ta, tb)
        torch.library.opcheck(torch.ops.fastpt.gemm, (a.requires_grad_(), b.requires_grad_(), ta, tb))


def test_linear_matches_f_linear_values_and_gradients():
    x = torch.randn(3, 17, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    y = ops.linear(x, w, bias)
    ref = F.linear(x.double(), w.double(), bias.double())
    assert y.shape == (3, 17, 48)
    assert_fp32_close(y, ref, 64)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, bias), g)
    refs = torch.autograd.grad(ref, (x, w, bias), g.double())
    for got, want, k in zip(grads, refs, (48, 51, 51)):
        assert_fp32_close(got, want, k)


def test_linear_falls_back_where_torch_is_faster_or_casts():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm_module.uses_gemm(x, w)
        assert ops.linear(x, w).dtype == torch.bfloat16        # as F.linear under autocast
    assert not gemm_module.uses_gemm(x.double(), w.double())
    assert torch.equal(ops.linear(x.double(), w.double()), F.linear(x.double(), w.double()))
    assert gemm_module.uses_gemm(x, w) == gemm_module.own_kernel_active()


@pytest.mark.parametrize("shape", [(1024, 64), (3, 350, 64), (2, 4, 130, 64)])
def test_linear_inference_on_onednn(shape):
    """Without autograd, float32 products of 1024 rows or more on CPUs where fastpt's GEMM runs
    go to oneDNN's kernel: float64-close, bias or not, strided x; with a gradient to compute,
    fewer rows or float64, they do not."""
    x, w, bias = torch.randn(shape), torch.randn(48, 64), torch.randn(48)
    expected = gemm_module.own_kernel_active() and _onednn.available()
    strided_bias = torch.stack([bias, torch.randn(48)], 1)[:, 0]  # oneDNN reads a bias densely
    transposed_w = w.t().contiguous().t()
    with torch.no_grad():
        assert gemm_module.onednn_inference(x, w, bias) == expected
        for b in (bias, None, strided_bias, bias[:1].expand(48)):
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            assert_fp32_close(ops.linear(x, w, b), ref, 64)
            assert_fp32_close(ops.linear(x.transpose(0, -1).contiguous().transpose(0, -1), w, b), ref, 64)
            assert_fp32_close(ops.linear(x, transposed_w, b), ref, 64)
        assert not gemm_module.onednn_inference(x.reshape(-1, 64)[:1023], w, bias)  # fastpt's GEMM
        assert not gemm_module.onednn_inference(x.double(), w.double())
        assert not gemm_module.onednn_inference(x, w, bias.double())     # F.linear's promotion / errors
    assert gemm_module.onednn_inference(x, w, bias) == expected          # no tensor requires grad
    assert not gemm_module.onednn_inference(x, w.requires_grad_(), bias)
    y = ops.linear(x, w, bias)
    assert y.requires_grad
    (grad_w,) = torch.autograd.grad(y.sum(), (w,))
    assert_fp32_close(grad_w, x.double().reshape(-1, 64).sum(0).expand(48, 64), x.numel() // 64)


def test_linear_with_no_inner_dimension_is_the_bias():
    """K = 0: x W^T is all zeros, as F.linear gives it, with and without autograd."""
    for x in (torch.randn(4, 0), torch.randn(4, 0, requires_grad=True)):
        assert torch.equal(ops.linear(x, torch.randn(3, 0)), torch.zeros(4, 3))
        assert torch.equal(ops.linear(x, torch.randn(3, 0), torch.ones(3)), torch.ones(4, 3))


def test_linear_under_compile_fullgraph():
    x, w, bias = torch.randn(2, 9, 32), torch.randn(24, 32), torch.randn(24)
    compiled = torch.compile(ops.linear, fullgraph=True)
    assert_fp32_close(compiled(x, w, bias), F.linear(x.double(), w.double(), bias.double()), 32)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        ops.gemm(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        ops.gemm(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(TypeError, match="float32, bfloat16 or float64"):
        ops.gemm(torch.ones(3, 4, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype of a"):
        ops.gemm(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="mat1 and mat2|shapes cannot be multiplied"):
        ops.linear(torch.randn(3, 4), torch.randn(5, 6))   # F.linear's own message


@pytest.mark.parametrize("bias", [torch.ones(5, dtype=torch.int32), torch.ones(5, dtype=torch.complex64),
                                  torch.ones(5, device="meta"), torch.ones(5, dtype=torch.float64)])
def test_linear_bias_of_another_dtype_or_device_fails_as_f_linear(bias):
    """The fast path must not cast such a bias silently: F.linear refuses it."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError) as expected:
        F.linear(x, w, bias)
    with pytest.raises(RuntimeError) as ours:
        ops.linear(x, w, bias)
    assert str(ours.value) == str(expected.value)


def test_linear_broadcast_bias_as_f_linear():
    x, w, bias = torch.randn(3, 4), torch.randn(5, 4), torch.randn(1, 5)
    torch.testing.assert_close(ops.linear(x, w, bias), F.linear(x, w, bias))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m, n, k", [(1, 37, 1000), (4, 5, 16), (300, 129, 257)])
def test_gemm_into_writes_or_adds_in_place(cpu_capability, m, n, k, ta, tb, accumulate):
    """c = op(a) op(b), or c += with accumulate, through every path (matrix-vector rows
    included: accumulate must not take the path that overwrites)."""
    a, b = operands(m, n, k, ta, tb)
    c = torch.randn(m, n)
    start = c.clone()
    assert ops.gemm_into_(c, a, b, ta, tb, accumulate=accumulate) is c
    assert_fp32_close(c, product(a, b, ta, tb) + (start.double() if accumulate else 0), k)


@pytest.mark.parametrize("tb", [False, True])
def test_gemm_into_bfloat16_sums_in_float32(cpu_capability, tb):
    """bf16 operands summed into a float32 c over chunks: no bf16 rounding of the partial
    sums, so the error is that of one fp32 product of the bf16 values."""
    a, b = operands(96, 70, 40, True, tb, torch.bfloat16)
    c = torch.zeros(96, 70)
    for s in range(0, 40, 16):  # a weight gradient over chunks of rows
        ops.gemm_into_(c, a[s:s + 16], b[:, s:s + 16] if tb else b[s:s + 16], True, tb, accumulate=True)
    assert_fp32_close(c, product(a, b, True, tb), 40)


def test_gemm_into_zero_inner_dimension():
    c = torch.ones(3, 2)
    ops.gemm_into_(c, torch.empty(3, 0), torch.empty(0, 2), accumulate=True)
    assert torch.equal(c, torch.ones(3, 2))
    ops.gemm_into_(c, torch.empty(3, 0), torch.empty(0, 2))
    assert torch.equal(c, torch.zeros(3, 2))


def test_gemm_into_opcheck():
    a, b = operands(9, 6, 11, False, True)
    torch.library.opcheck(torch.ops.fastpt.gemm_into_.default, (torch.zeros(9, 6), a, b, False, True, True))


def test_gemm_into_bad_output():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"c must have shape \(3, 2\)"):
        ops.gemm_into_(torch.zeros(2, 3), a, b)
    with pytest.raises(TypeError, match="c must be Float for BFloat16"):
        ops.gemm_into_(torch.zeros(3, 2, dtype=torch.bfloat16), a.bfloat16(), b.bfloat16())
    with pytest.raises(ValueError, match="contiguous"):
        ops.gemm_into_(torch.zeros(2, 3).t(), a, b)
    square = torch.randn(4, 4)
    with pytest.raises(ValueError, match="must not share memory"):
        ops.gemm_into_(square, square, torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="no autograd"):
        ops.gemm_into_(torch.zeros(3, 2), a.requires_grad_(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tb", [False, True])
def test_row_stride_past_int32(cpu_capability, dtype, tb):
    # BLAS takes int leading dims; a one-row view may have any row stride (it is never
    # stepped), so 2**31 needs no memory. It used to wrap to -2**31: MKL refused the product
    # ("Parameter 10 was incorrect") and left the output unwritten.
    a = torch.randn(64, dtype=dtype).as_strided((1, 64), (2**31, 1))
    b = torch.randn(64, dtype=dtype).as_strided((1, 64), (2**32 + 3, 1)) if tb else torch.randn(64, 8, dtype=dtype)
    out = ops.gemm(a, b, trans_b=tb)
    if dtype == torch.bfloat16:  # one bf16 rounding of the output
        torch.testing.assert_close(out.double(), product(a, b, False, tb).to(dtype).double(), rtol=1e-2, atol=1e-2)
    else:  # float32 / float64: the ordinary accuracy, not bf16's tolerance
        assert_fp32_close(out, product(a, b, False, tb), 64)
