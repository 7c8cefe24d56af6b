"""fastpt.ops.rope / rope_ against the float64 reference, gradients, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch

from fastpt import ops
from fastpt.ops import reference
from reference_check import check_against_reference as check
from tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["half", "interleaved"]


def _tables(P, D, dtype=torch.float32):
    return reference.rope_tables(P, D, base=10000.0, dtype=dtype)


def check_against_reference(q, k, cos, sin, pos, layout, dtype):
    grads = (torch.randn(q.shape), torch.randn(k.shape))
    if dtype == torch.float64:  # float64 inputs take float64 tables in both implementations
        cos, sin = cos.double(), sin.double()
    check(ops.rope, reference.rope, ("q", "k", "grad q", "grad k"), (q, k), grads, dtype, cos, sin, pos,
          layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 40, 64, 80, 128])
def test_matches_float64_reference(cpu_capability, head_dim, dtype, layout):
    B, H, Hkv, T = 2, 4, 2, 7  # GQA: k has fewer heads
    q, k = torch.randn(B, H, T, head_dim), torch.randn(B, Hkv, T, head_dim)
    cos, sin = _tables(T + 3, head_dim)
    check_against_reference(q, k, cos, sin, None, layout, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T", [1, 97, 1025])
def test_long_and_single_token_sequences(cpu_capability, T, layout):
    q, k = torch.randn(1, 3, T, 64), torch.randn(1, 1, T, 64)
    cos, sin = _tables(T, 64)
    check_against_reference(q, k, cos, sin, None, layout, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_rotary_passes_the_rest_through(layout):
    q, k = torch.randn(2, 4, 5, 80), torch.randn(2, 2, 5, 80)
    cos, sin = _tables(5, 32)  # rotate 32 of 80 features
    check_against_reference(q, k, cos, sin, None, layout, torch.float32)
    qo, ko = ops.rope(q, k, cos, sin, layout=layout)
    assert torch.equal(qo[..., 32:], q[..., 32:]) and torch.equal(ko[..., 32:], k[..., 32:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_offsets_per_batch_row(layout):
    B, T, D = 3, 4, 64
    q, k = torch.randn(B, 8, T, D), torch.randn(B, 2, T, D)
    cos, sin = _tables(64, D)
    pos = torch.stack([torch.arange(o, o + T) for o in (0, 5, 40)])  # (B, T)
    check_against_reference(q, k, cos, sin, pos, layout, torch.float32)
    shared = torch.arange(9, 9 + T, dtype=torch.int32)  # (T,), int32
    check_against_reference(q, k, cos, sin, shared, layout, torch.float32)


def test_decode_step_equals_slice_of_full_sequence():
    T, D = 12, 32
    q, k = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    cos, sin = _tables(T, D)
    full_q, full_k = ops.rope(q, k, cos, sin)
    step_q, step_k = ops.rope(q[:, :, -1:], k[:, :, -1:], cos, sin, torch.tensor([T - 1]))
    torch.testing.assert_close(step_q, full_q[:, :, -1:])
    torch.testing.assert_close(step_k, full_k[:, :, -1:])


def test_bthd_layout_through_a_strided_view():
    B, T, H, D = 2, 6, 4, 64
    qkv = torch.randn(B, T, 3, H, D)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, T, D) views
    assert not q.is_contiguous()
    cos, sin = _tables(T, D)
    check_against_reference(q, k, cos, sin, None, "half", torch.float32)


@pytest.mark.parametrize("shape", [(7, 64), (3, 7, 64), (2, 3, 2, 7, 64)])
def test_leading_dims(shape):
    q, k = torch.randn(shape), torch.randn(shape)
    cos, sin = _tables(7, 64)
    check_against_reference(q, k, cos, sin, None, "half", torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [40, 64, 80])  # bf16 tables: full chunks in lane order, tails
def test_bf16_tables(cpu_capability, head_dim, layout):
    q = torch.randn(2, 4, 9, head_dim, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 9, head_dim, dtype=torch.bfloat16)
    cos, sin = _tables(9, head_dim, torch.bfloat16)
    qo, ko = ops.rope(q, k, cos, sin, layout=layout)
    qr, kr = reference.rope(q.double(), k.double(), cos.double(), sin.double(), layout=layout)
    qe, ke = reference.rope(q, k, cos, sin, layout=layout)
    assert_close(qo, qr, torch.bfloat16, eager=qe)
    assert_close(ko, kr, torch.bfloat16, eager=ke)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_matches_out_of_place(layout):
    q, k = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 9, 64)
    cos, sin = _tables(16, 64)
    pos = torch.arange(3, 12)
    expected = ops.rope(q, k, cos, sin, pos, layout=layout)
    q2, k2 = q.clone(), k.clone()
    out = ops.rope_(q2, k2, cos, sin, pos, layout=layout)
    assert out[0] is q2 and out[1] is k2
    torch.testing.assert_close((q2, k2), expected)


def test_inplace_on_strided_view_writes_through():
    qkv = torch.randn(2, 5, 3, 4, 32)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    cos, sin = _tables(5, 32)
    expected = ops.rope(q, k, cos, sin)
    ops.rope_(q, k, cos, sin)
    torch.testing.assert_close(qkv[:, :, 0].transpose(1, 2), expected[0])


def test_inplace_refuses_targets_that_share_memory():
    """Each element of q and k is rotated once: an expanded q, q and k overlapping in one
    buffer, or k aliasing q are refused (the packed-qkv views above are not)."""
    cos, sin = torch.zeros(1, 1), torch.ones(1, 1)  # a quarter turn of the one pair (D = 2)
    k = torch.zeros(1, 1, 1, 2)
    with pytest.raises(ValueError, match="share memory"):
        ops.rope_(torch.tensor([1.0, 0.0]).expand(1, 4, 1, 2), k, cos, sin)
    buf = torch.randn(1, 4, 1, 2)
    for q, k2 in ((buf[:, 0:2], buf[:, 1:3]), (buf, buf.view(buf.shape)), (buf, buf)):
        with pytest.raises(ValueError, match="share memory"):
            ops.rope_(q, k2, cos, sin)
    strided = torch.randn(1, 6, 1, 4)
    with pytest.raises(ValueError, match="share memory"):  # ATen cannot decide: offsets compared
        ops.rope_(strided[:, 0:4, :, ::2], strided[:, 2:6, :, ::2], cos, sin)
    expected = ops.rope(strided[:, :, :, ::2], strided[:, :, :, 1::2], cos, sin)
    ops.rope_(strided[:, :, :, ::2], strided[:, :, :, 1::2], cos, sin)  # interleaved, disjoint
    torch.testing.assert_close((strided[:, :, :, ::2], strided[:, :, :, 1::2]), expected)


def test_inplace_takes_a_strided_view_beside_a_separate_tensor():
    """ATen cannot decide the overlap of a non-dense view: that of a tensor with another
    storage was decided from element offsets all the same, and refused as shared memory."""
    cos, sin = _tables(5, 8)
    qkv = torch.randn(1, 5, 8, 8)
    for q, k in ((qkv[:, :, :4].transpose(1, 2), torch.randn(1, 2, 5, 8)),
                 (torch.randn(2, 4, 5, 8, 2)[..., 0], torch.randn(2, 2, 5, 8))):
        expected = ops.rope(q, k, cos, sin)
        ops.rope_(q, k, cos, sin)
        torch.testing.assert_close((q, k), expected)


def test_inplace_refuses_autograd():
    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    cos, sin = _tables(3, 8)
    with pytest.raises(RuntimeError, match="no autograd"):
        ops.rope_(q, torch.randn(1, 1, 3, 8), cos, sin)
    # The op itself, called directly, refuses too: it left y an identity gradient through it.
    y = q * 1
    with pytest.raises(RuntimeError, match="fastpt::rope_ works in place and has no autograd"):
        torch.ops.fastpt.rope_(y, torch.randn(1, 1, 3, 8), cos, sin, None, False)
    with torch.no_grad():
        torch.ops.fastpt.rope_(y, torch.randn(1, 1, 3, 8), cos, sin, None, False)


def test_gradcheck_float64():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(3, 8, torch.float64)
    for layout in LAYOUTS:
        assert torch.autograd.gradcheck(lambda a, b: ops.rope(a, b, cos, sin, layout=layout), (q, k))


@pytest.mark.parametrize("interleaved", [False, True])
def test_opcheck(interleaved):
    q = torch.randn(2, 4, 5, 16, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, requires_grad=True)
    cos, sin = _tables(8, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    torch.library.opcheck(torch.ops.fastpt.rope.default, (q, k, cos, sin, pos, interleaved))
    torch.library.opcheck(torch.ops.fastpt.rope.default, (q, k, cos, sin, None, interleaved))
    torch.library.opcheck(torch.ops.fastpt.rope_backward.default,
                          (q.detach(), k.detach(), cos, sin, pos, interleaved))
    torch.library.opcheck(torch.ops.fastpt.rope_.default,
                          (q.detach().clone(), k.detach().clone(), cos, sin, pos, interleaved))


def test_torch_compile_fullgraph():
    cos, sin = _tables(16, 32)

    def f(q, k):
        qo, ko = ops.rope(q, k, cos, sin)
        return (qo * 3).sum() + ko.sum()

    q = torch.randn(1, 2, 6, 32, requires_grad=True)
    k = torch.randn(1, 1, 6, 32, requires_grad=True)
    out = torch.compile(f, fullgraph=True)(q, k)
    grads = torch.autograd.grad(out, (q, k))
    ref = f(q, k)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k))):
        torch.testing.assert_close(a, b)


def test_empty_inputs():
    cos, sin = _tables(4, 8)
    q, k = torch.randn(0, 2, 4, 8, requires_grad=True), torch.randn(0, 2, 4, 8)
    qo, ko = ops.rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape
    qo.sum().backward()
    q0, k0 = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    assert ops.rope(q0, k0, cos, sin)[0].shape == q0.shape


def test_nan_propagates_like_eager():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    q[0, 0, 1, 2] = float("nan")
    cos, sin = _tables(4, 8)
    ours, ref = ops.rope(q, k, cos, sin)[0], reference.rope(q, k, cos, sin)[0]
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))


def _bad(**overrides):
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 5, 16), cos=_tables(8, 16)[0],
                sin=_tables(8, 16)[1], position_ids=None, layout="half")
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), TypeError, "q must be"),
        (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float16)), TypeError, "k must have the dtype"),
        (dict(k=torch.randn(2, 2, 6, 16)), ValueError, "same T and D"),
        (dict(k=torch.randn(3, 2, 5, 16)), ValueError, "same batch size"),
        (dict(q=torch.randn(16)), ValueError, r"\(\.\.\., T, D\)"),
        (dict(cos=torch.randn(8, 9), sin=torch.randn(8, 9)), ValueError, "R <= D/2"),
        (dict(sin=torch.randn(8, 4)), ValueError, "sin must have the shape"),
        (dict(cos=_tables(8, 16, torch.float16)[0], sin=_tables(8, 16, torch.float16)[1]), TypeError,
         "float32 or the dtype of q"),
        (dict(cos=_tables(4, 16)[0], sin=_tables(4, 16)[1]), ValueError, "at least T rows"),
        (dict(position_ids=torch.tensor([0, 1, 2, 3, 8])), ValueError, r"lie in \[0, 8\)"),
        (dict(position_ids=torch.tensor([0, -1, 2, 3, 4])), ValueError, r"lie in \[0, 8\)"),
        (dict(position_ids=torch.arange(4)), ValueError, r"position_ids must be \(T,\)"),
        (dict(position_ids=torch.zeros(3, 5, dtype=torch.long)), ValueError, r"position_ids must be \(T,\)"),
        (dict(position_ids=torch.zeros(5)), TypeError, "int64 or int32"),
        # a 2-D k has no batch: it was rotated by the first row of per-batch positions
        (dict(k=torch.randn(5, 16), position_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError,
         "need q and k both batched"),
        (dict(layout="neox"), ValueError, "layout must be"),
    ],
)
def test_bad_input(overrides, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        ops.rope(args["q"], args["k"], args["cos"], args["sin"], args["position_ids"], layout=args["layout"])


def test_tables_on_another_device():
    args = _bad(cos=torch.ones(8, 8, device="meta"), sin=torch.ones(8, 8, device="meta"))
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        ops.rope(args["q"], args["k"], args["cos"], args["sin"])
