"""fastpt.ops.rms_norm against the float64 reference, gradients, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch

from fastpt import ops
from fastpt.ops import reference
from reference_check import check_against_reference as check

EPS = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(rows, hidden) for rows in (1, 7, 97, 1025) for hidden in (1, 3, 13, 4097)]


def _inputs(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    return x, w, dy


def check_against_reference(x, w, dy, dtype):
    check(ops.rms_norm, reference.rms_norm, ("y", "grad x", "grad weight"), (x, w), (dy,), dtype, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(cpu_capability, shape, dtype):
    check_against_reference(*_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("shape", [(13,), (2, 3, 40), (2, 3, 5, 129)])
def test_leading_dims(shape):
    check_against_reference(*_inputs(shape, torch.float32), torch.float32)


def test_float64_matches_reference_exactly_enough():
    check_against_reference(*_inputs((5, 33), torch.float64), torch.float64)


@pytest.mark.parametrize("layout", ["strided_rows", "transposed"])
def test_non_contiguous_input(layout):
    base = torch.randn(8, 64)
    x = base[::2] if layout == "strided_rows" else base.t()
    assert not x.is_contiguous()
    w = torch.randn(x.shape[-1])
    torch.testing.assert_close(ops.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))


def test_gradcheck_float64():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, EPS), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(4, 37, dtype=dtype, requires_grad=True)
    w = torch.randn(37, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpt.rms_norm.default, (x, w, EPS))
    _, rstd = torch.ops.fastpt.rms_norm(x.detach(), w.detach(), EPS)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastpt.rms_norm_backward.default, (dy, x.detach(), w.detach(), rstd))


def test_torch_compile_fullgraph():
    def f(x, w):
        return ops.rms_norm(x, w, EPS).sum()

    x = torch.randn(6, 50, requires_grad=True)
    w = torch.randn(50, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(x, w)
    gx, gw = torch.autograd.grad(out, (x, w))
    ref = f(x, w)
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_empty_inputs():
    for shape in [(0, 8), (4, 0), (0, 0)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[-1], requires_grad=True)
        y = ops.rms_norm(x, w, EPS)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_nan_and_inf_propagate_like_eager():
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    w = torch.randn(16)
    y, ref = ops.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(y[[0, 3]], ref[[0, 3]])


@pytest.mark.parametrize(
    "x, w, eps, error, match",
    [
        (torch.ones(4, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), EPS, TypeError, "x must be"),
        (torch.ones(4, 8), torch.ones(8, dtype=torch.float16), EPS, TypeError, "weight must have the dtype"),
        (torch.ones(4, 8), None, EPS, TypeError, "weight must be a tensor, got None"),  # was "UNKNOWN_SCALAR"
        (torch.ones(4, 8), torch.ones(7), EPS, ValueError, "weight must have shape"),
        (torch.ones(4, 8), torch.ones(2, 4), EPS, ValueError, "weight must have shape"),
        (torch.tensor(1.0), torch.ones(1), EPS, ValueError, "at least 1 dimension"),
        (torch.ones(4, 8), torch.ones(8), 0.0, ValueError, "eps must be"),
        (torch.ones(4, 8), torch.ones(8), -1e-5, ValueError, "eps must be"),
        (torch.ones(4, 8), torch.ones(8), float("nan"), ValueError, "eps must be"),
    ],
)
def test_bad_input(x, w, eps, error, match):
    with pytest.raises(error, match=match):
        ops.rms_norm(x, w, eps)


def test_weight_on_another_device():
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.rms_norm(torch.ones(4, 8), torch.ones(8, device="meta"), EPS)
