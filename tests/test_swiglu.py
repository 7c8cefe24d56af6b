"""fastpt.ops.swiglu against the float64 reference, gradients, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch

from fastpt import ops
from fastpt.ops import reference
from reference_check import check_against_reference as check

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(rows, hidden) for rows in (1, 7, 97, 1025) for hidden in (1, 3, 13, 4097)]


def check_against_reference(gate, up, grad, dtype):
    check(ops.swiglu, reference.swiglu, ("out", "grad gate", "grad up"), (gate, up), (grad,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(cpu_capability, shape, dtype):
    gate, up, grad = (4 * torch.randn(shape)).to(dtype), torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    check_against_reference(gate, up, grad, dtype)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 40), (2, 3, 5, 129)])
def test_leading_dims(shape):
    check_against_reference(torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.float32)


def test_extreme_gate_values(cpu_capability):
    gate = torch.tensor([-1e4, -100.0, -88.5, -20.0, -1e-8, 0.0, 1e-8, 20.0, 88.5, 100.0, 1e4] * 3)
    up = torch.linspace(-2, 2, gate.numel())
    check_against_reference(gate, up, torch.ones_like(gate), torch.float32)


def test_nan_and_inf_follow_eager():
    gate = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 9)
    up = torch.tensor([1.0, 2.0, 3.0, float("inf")] * 9)
    out, ref = ops.swiglu(gate, up), reference.swiglu(gate, up)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(out[finite], ref[finite])


def test_bf16_output_rounds_like_torch(cpu_capability):
    # For gate >= 32, exp(-gate) vanishes beside 1 in fp32, so the kernel's fp32 result is
    # gate * up, exact (two 8-bit mantissas). Its bf16 output must then be torch's
    # round-to-nearest-even of that product bit for bit, ties included (the AVX2 build rounds
    # bf16 with its own code, cpu_vec.h's store2_lanes), and NaN must stay NaN. 4099 elements:
    # 256 full chunks and a tail.
    g = torch.Generator().manual_seed(0)
    gate = (32 + 1000 * torch.rand(4099, generator=g)).to(torch.bfloat16)
    up = torch.randn(4099, generator=g).to(torch.bfloat16)
    gate[[5, 4098]] = float("nan")
    up[[7, 4000]] = float("nan")
    gate[[9, 4001]] = float("inf")
    product = gate.float() * up.float()
    expected = product.to(torch.bfloat16)
    low_bits = product.view(torch.int32) & 0xFFFF
    assert int((low_bits == 0x8000).sum()) > 5, "the data must contain round-half-to-even ties"
    out = ops.swiglu(gate, up)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_float64():
    check_against_reference(torch.randn(5, 33), torch.randn(5, 33), torch.randn(5, 33), torch.float64)


def test_non_contiguous_input():
    gate = torch.randn(16, 32)[:, ::2]
    up = torch.randn(16, 16).t()
    torch.testing.assert_close(ops.swiglu(gate, up), reference.swiglu(gate, up))


def test_gradcheck_float64():
    gate = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    gate = torch.randn(4, 37, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 37, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpt.swiglu.default, (gate, up))
    grad = torch.randn(4, 37, dtype=dtype)
    torch.library.opcheck(torch.ops.fastpt.swiglu_backward.default, (grad, gate.detach(), up.detach()))


def test_torch_compile_fullgraph():
    def f(g, u):
        return (ops.swiglu(g, u) * 2).sum()

    g = torch.randn(6, 50, requires_grad=True)
    u = torch.randn(6, 50, requires_grad=True)
    out = torch.compile(f, fullgraph=True)(g, u)
    grads = torch.autograd.grad(out, (g, u))
    ref = f(g, u)
    ref_grads = torch.autograd.grad(ref, (g, u))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_empty_inputs():
    g = torch.randn(0, 8, requires_grad=True)
    u = torch.randn(0, 8, requires_grad=True)
    out = ops.swiglu(g, u)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert g.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "gate, up, error, match",
    [
        (torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), TypeError, "gate must be"),
        (torch.ones(4), torch.ones(4, dtype=torch.bfloat16), TypeError, "up must have the dtype"),
        (torch.ones(4), None, TypeError, "up must be a tensor, got None"),
        (torch.ones(4, 8), torch.ones(4, 7), ValueError, "up must have the shape"),
        (torch.ones(4, 8), torch.ones(8), ValueError, "up must have the shape"),
    ],
)
def test_bad_input(gate, up, error, match):
    with pytest.raises(error, match=match):
        ops.swiglu(gate, up)


def test_input_on_another_device():
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.swiglu(torch.ones(4), torch.ones(4, device="meta"))
