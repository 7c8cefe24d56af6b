"""fastpt.ops.lora_linear: the float64 reference, gradients, dropout masks, an Int8Linear base,
opcheck, NaN, and bad input to the forward and the backward op."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpt import ops
from fastpt.nn import Int8Linear
from fastpt.ops import reference_finetune as ref
from reference_check import check_against_reference as check


def fastpt_fn(x, a, b, w, scale, bias):
    return ops.lora_linear(x, w.to(x.dtype), a, b, scale, None if bias is None else bias.to(x.dtype))


def reference_fn(x, a, b, w, scale, bias):
    return ref.lora_linear(x, w.to(x.dtype), a, b, scale, None if bias is None else bias.to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("m, k, n, r", [(1, 1, 1, 1), (7, 13, 5, 3), (97, 64, 130, 16), (33, 257, 40, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(dtype, m, k, n, r, bias):
    x, w = torch.randn(m, k), torch.randn(n, k) / math.sqrt(k)
    a, b = torch.randn(r, k) / math.sqrt(k), torch.randn(n, r)
    bias_t = torch.randn(n) if bias else None
    check(fastpt_fn, reference_fn, ("out", "grad x", "grad A", "grad B"), (x, a, b), (torch.randn(m, n),),
          dtype, w, 0.5, bias_t)


def test_leading_dims():
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    a, b = torch.randn(4, 40), torch.randn(24, 4)
    check(fastpt_fn, reference_fn, ("out", "grad x", "grad A", "grad B"), (x, a, b), (torch.randn(2, 3, 24),),
          torch.float32, w, 2.0, torch.randn(24))


def test_meta_tensors_give_the_output_shape():
    """Shape inference (meta tensors) passes through the Python wrapper to the op."""
    x, w = torch.empty(4, 6, 32, device="meta"), torch.empty(24, 32, device="meta")
    a, b = torch.empty(8, 32, device="meta"), torch.empty(24, 8, device="meta")
    out = ops.lora_linear(x, w, a, b, 2.0)
    assert out.device.type == "meta" and out.shape == (4, 6, 24)


def test_gradcheck_float64():
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64)
    a = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a, b: ops.lora_linear(x, w, a, b, 0.7, bias), (x, a, b))

    def with_dropout(x, a, b):
        torch.manual_seed(7)  # the same mask on every call
        return ops.lora_linear(x, w, a, b, 0.7, bias, dropout_p=0.3)

    assert torch.autograd.gradcheck(with_dropout, (x, a, b))


def test_dropout_mask_matches_reference():
    x, w = torch.randn(64, 50), torch.randn(30, 50)
    a, b = torch.randn(4, 50, requires_grad=True), torch.randn(30, 4, requires_grad=True)
    torch.manual_seed(11)
    out = ops.lora_linear(x, w, a, b, 0.5, dropout_p=0.25)
    torch.manual_seed(11)
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    keep = torch.ops.fastpt.hash_dropout(torch.ones_like(x), 0.25, seed) * 0.75
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep.mean().item() - 0.75) < 0.03
    expect = F.linear(x, w) + 0.5 * ((x * keep / 0.75) @ a.T) @ b.T
    torch.testing.assert_close(out, expect)


def test_int8_base():
    lin = nn.Linear(96, 48)
    base = Int8Linear.from_linear(lin)
    a, b = torch.randn(8, 96, requires_grad=True), torch.randn(48, 8, requires_grad=True)
    x = torch.randn(3, 20, 96, requires_grad=True)
    out = ops.lora_linear(x, base, a, b, 0.25)
    expect = base(x) + 0.25 * (x @ a.T) @ b.T
    torch.testing.assert_close(out, expect)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, a, b), g)
    grads_ref = torch.autograd.grad(expect, (x, a, b), g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="bias must be None with a base layer"):
        ops.lora_linear(x, base, a, b, 0.25, bias=torch.zeros(48))


def test_opcheck():
    x = torch.randn(7, 20, requires_grad=True)
    w, bias = torch.randn(12, 20), torch.randn(12)
    a, b = torch.randn(3, 20, requires_grad=True), torch.randn(12, 3, requires_grad=True)
    seed = torch.tensor(5)
    torch.library.opcheck(torch.ops.fastpt.lora_linear.default, (x, w, None, a, b, 0.5, bias, 0.0, None))
    torch.library.opcheck(torch.ops.fastpt.lora_linear.default, (x, w, None, a, b, 0.5, None, 0.2, seed))
    base_out = torch.randn(7, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpt.lora_linear.default, (x, None, base_out, a, b, 0.5, None, 0.0, None))
    g = torch.randn(7, 12)
    torch.library.opcheck(torch.ops.fastpt.lora_linear_backward.default,
                          (g, x.detach(), w, a.detach(), b.detach(), 0.5, 0.2, seed, True))
    torch.library.opcheck(torch.ops.fastpt.hash_dropout.default, (x.detach(), 0.3, seed))


def test_nan_propagates_as_in_eager():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    x[1, 3] = float("nan")
    out = ops.lora_linear(x, w, a, b, 1.0)
    assert torch.equal(out.isnan(), ref.lora_linear(x, w, a, b, 1.0).isnan())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"w": torch.randn(8, 15)}, ValueError, r"x's last dim is 16 but weight is \(out_features, in_features\)"),
        ({"b": torch.randn(5, 2)}, ValueError, r"lora_b must be \(out_features, r\) = \(8, 2\)"),  # not "weight"
        ({"scale": float("nan")}, ValueError, "scale must be a finite number"),
        ({"a": torch.randn(2, 15)}, ValueError, "lora_a must be"),
        ({"b": torch.randn(8, 3)}, ValueError, "lora_b must be"),
        ({"a": torch.randn(2, 16, dtype=torch.float64)}, TypeError, "lora_a must have the dtype"),
        ({"x": torch.ones(4, 16, dtype=torch.int8)}, TypeError, "x must be"),
        ({"bias": torch.randn(7)}, ValueError, "bias must have shape"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(4, 16), "w": torch.randn(8, 16), "a": torch.randn(2, 16), "b": torch.randn(8, 2),
            "bias": None, "dropout_p": 0.0, "scale": 1.0}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.lora_linear(args["x"], args["w"], args["a"], args["b"], args["scale"], args["bias"], args["dropout_p"])


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("grad_shape, error, match", [
    ((2, 2, 8), ValueError, r"grad_out must be x's shape with the last dim out_features"),  # same numel
    ((4, 7), ValueError, r"grad_out's last dim must be out_features = 8|lora_b must be \(out_features, r\) = \(7"),
    ((), ValueError, "grad_out must be x's shape"),
])
def test_backward_op_checks_grad_out(device, with_weight, grad_shape, error, match):
    """The backward op reshaped any grad_out of m * n elements to (m, n): wrong gradients."""
    x, w, a, b = (torch.randn(*s, device=device) for s in ((4, 16), (8, 16), (2, 16), (8, 2)))
    with pytest.raises(error, match=match):
        torch.ops.fastpt.lora_linear_backward(torch.randn(grad_shape, device=device), x, w if with_weight else None,
                                              a, b, 1.0, 0.0, None, True)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        torch.ops.fastpt.lora_linear_backward(torch.randn(4, 8, dtype=torch.float64, device=device), x,
                                              w if with_weight else None, a, b, 1.0, 0.0, None, True)
