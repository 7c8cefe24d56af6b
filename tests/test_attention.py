"""fastpt.ops.attention against the float64 reference: masks, GQA, bias, dropout, gradients,
opcheck, compile, odd sizes, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastpt import ops
from fastpt.ops import reference
from reference_check import check_against_reference as check
from reference_check import run_with_grads
from tolerances import assert_close

attention_module = importlib.import_module("fastpt.ops.attention")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("out", "grad q", "grad k", "grad v")


def qkv(B, H, Hkv, T, S, D):
    return torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)


def check_against_reference(q, k, v, dtype, **kwargs):
    grad = torch.randn(q.shape)
    check(ops.attention, reference.attention, NAMES, (q, k, v), (grad,), dtype, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 40, 64, 80, 96, 128])
def test_matches_float64_reference(cpu_capability, head_dim, dtype, causal):
    q, k, v = qkv(2, 4, 2, 33, 45, head_dim)  # GQA, cross lengths
    check_against_reference(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T, S", [(1, 1), (1, 7), (7, 1), (7, 97), (97, 7), (97, 97), (1, 300), (300, 257)])
def test_odd_sizes(T, S, causal):
    q, k, v = qkv(1, 3, 1, T, S, 80)  # MQA
    if S > 1:
        check_against_reference(q, k, v, torch.float32, causal=causal)
        return
    # One key: softmax is the constant 1, so grad q and grad k cancel to exactly 0 in eager
    # PyTorch; ours are built from P * (dP - Delta) with dP and Delta rounded differently: ~1e-7.
    grad = torch.randn(q.shape)
    ours = run_with_grads(ops.attention, (q, k, v), (grad,), torch.float32, causal=causal)
    ref = run_with_grads(reference.attention, (q, k, v), (grad,), torch.float64, causal=causal)
    for i, (name, a, r) in enumerate(zip(NAMES, ours, ref)):
        if name in ("grad q", "grad k"):
            assert a.abs().max() <= 1e-5 * grad.abs().max() * v.abs().max()
        else:
            assert_close(a, r, torch.float32, "fwd" if i == 0 else "bwd", what=name)


@pytest.mark.parametrize("T, S, D", [(1, 7, 40), (7, 97, 80), (97, 7, 64), (33, 300, 96), (300, 33, 128)])
def test_odd_sizes_bf16(cpu_capability, T, S, D):
    """Odd lengths are odd inner dimensions of the bf16 tile products (P V over S keys, the
    backward's P^T dO over T queries) and partial tiles in every direction; the AVX512_BF16
    build runs its own VDPBF16PS products (attention_dpbf16.h) on CPUs without AMX."""
    q, k, v = qkv(1, 2, 1, T, S, D)
    check_against_reference(q, k, v, torch.bfloat16, causal=T <= S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence(dtype):
    q, k, v = qkv(1, 2, 1, 1025, 1025, 64)
    check_against_reference(q, k, v, dtype, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask_and_fully_masked_rows(cpu_capability, dtype):
    B, S = 3, 37
    q, k, v = qkv(B, 4, 4, 19, S, 64)
    mask = torch.rand(B, S) > 0.4
    mask[1] = False  # batch row 1 sees no key at all
    check_against_reference(q, k, v, dtype, key_padding_mask=mask, causal=True)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, key_padding_mask=mask)
    out.sum().backward()
    assert torch.all(out[1] == 0)
    for t in [out, *(x.grad for x in leaves)]:
        assert torch.isfinite(t).all()
    assert torch.all(leaves[0].grad[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_inputs_reach_the_output_in_every_dtype(cpu_capability, dtype):
    """As eager attention: a NaN or inf logit makes its row NaN. bf16/fp16 used a cheaper exp
    that mapped NaN to a finite value, so such rows came out as zeros, as if masked."""
    q, k, v = qkv(1, 2, 2, 5, 9, 32)
    q[0, 0, 1, 3], q[0, 1, 2, 0] = float("nan"), float("inf")
    bias = torch.zeros(5, 9)
    bias[4, 6] = float("nan")
    out = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_bias=bias.to(dtype))
    nan_rows = torch.isnan(out).all(-1)
    assert nan_rows[0, 0, 1] and nan_rows[0, 1, 2] and nan_rows[0, :, 4].all()
    assert nan_rows.sum() == 4 and torch.isfinite(out[~nan_rows]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [5, 7, 33])
def test_nan_reaches_the_output_of_a_single_query(cpu_capability, dtype, S):
    """T = 1 takes its own kernel. There a row of NaN logits (S below two vector widths, all
    in the max's scalar tail, which skips NaN) read as a row without keys: zeros, lse -inf
    and a zero gradient, where eager attention and the tiled path give NaN."""
    q, k, v = qkv(1, 2, 2, 1, S, 32)
    q[0, 0, 0, 3] = float("nan")
    bias = torch.zeros(2, 1, S)
    bias[1, 0, 2] = float("nan")
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ops.attention(q, k, v, attn_bias=bias.to(dtype), return_lse=True)
    assert torch.isnan(out[0, :, 0]).all() and torch.isnan(lse[0, :, 0]).all()
    out.sum().backward()
    assert torch.isnan(q.grad[0, :, 0]).all()
    # a row whose keys are all masked still gives zeros and lse -inf, with no NaN
    mask = torch.zeros(1, S, dtype=torch.bool)
    out, lse = ops.attention(q.detach().nan_to_num(), k.detach(), v.detach(), key_padding_mask=mask, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_causal_with_more_queries_than_keys_gives_zero_rows():
    q, k, v = qkv(1, 2, 2, 9, 4, 32)  # queries 0..4 see no key (bottom-right alignment)
    check_against_reference(q, k, v, torch.float32, causal=True)
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))


def test_decode_step_equals_last_row_of_full_sequence():
    T, D = 23, 64
    q, k, v = qkv(2, 8, 2, T, T, D)
    full = ops.attention(q, k, v, causal=True)
    step = ops.attention(q[:, :, -1:], k, v, causal=True)  # T = 1 against the whole cache
    torch.testing.assert_close(step, full[:, :, -1:])
    chunk = ops.attention(q[:, :, -5:], k, v, causal=True)  # T = 5 new tokens
    torch.testing.assert_close(chunk, full[:, :, -5:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, D", [(2, 64), (33, 40), (600, 64), (97, 80), (65, 128)])
def test_single_query_path(cpu_capability, S, D, dtype):
    """T = 1 without dropout (a decoding step) takes its own kernel: GQA, odd head dims and
    key counts, the KV cache as a strided view of a longer preallocated buffer; forward and
    (through the regular backward, from its lse) gradients against float64."""
    B, H, Hkv = 2, 8, 2
    cache_k, cache_v = torch.randn(B, Hkv, S + 9, D), torch.randn(B, Hkv, S + 9, D)
    q = torch.randn(B, H, 1, D)
    check_against_reference(q, cache_k[:, :, :S], cache_v[:, :, :S], dtype, causal=True)


def test_single_query_masks_bias_and_many_tasks():
    """Key padding (one row with no visible key: 0 and lse -inf), a T5-style bias, and a step
    large enough to be split over threads."""
    B, H, Hkv, S, D = 4, 8, 2, 600, 64
    q, k, v = qkv(B, H, Hkv, 1, S, D)
    mask = torch.rand(B, S) > 0.3
    mask[2] = False
    bias = torch.randn(1, H, 1, S)
    out, lse = ops.attention(q, k, v, key_padding_mask=mask, attn_bias=bias, return_lse=True)
    ref = reference.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, attn_bias=bias.double())
    assert_close(out, ref, torch.float32, "fwd", what="out")
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))
    logits = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) / D ** 0.5 + bias
    want = logits.masked_fill(~mask[:, None, None, :], float("-inf")).logsumexp(-1)
    assert torch.allclose(lse[[0, 1, 3]].double(), want[[0, 1, 3]], atol=1e-5)


def test_single_query_gradcheck():
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=True), (q, k, v))


@pytest.mark.parametrize("bias_shape", [(4, 11, 13), (1, 4, 11, 13), (2, 1, 1, 13), (2, 4, 1, 13), (13,)])
def test_additive_bias_and_its_gradient(bias_shape):
    q, k, v = qkv(2, 4, 4, 11, 13, 40)
    bias = torch.randn(bias_shape)
    check_against_reference(q, k, v, torch.float32, attn_bias=bias, scale=1.0)  # T5: no 1/sqrt(D)
    b64 = bias.double().requires_grad_()
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(q.shape, dtype=torch.float64)
    ours = torch.autograd.grad(ops.attention(*leaves, attn_bias=b64, causal=True), b64, grad)[0]
    leaves = [t.detach().requires_grad_() for t in leaves]
    ref = torch.autograd.grad(reference.attention(*leaves, attn_bias=b64, causal=True), b64, grad)[0]
    assert_close(ours, ref, torch.float64, "bwd", what="grad bias")
    b32 = bias.clone().requires_grad_()
    ours32 = torch.autograd.grad(ops.attention(q, k, v, attn_bias=b32, causal=True), b32, grad.float())[0]
    assert_close(ours32, ref, torch.float32, "bwd", what="grad bias fp32")


def test_low_precision_bias():
    q, k, v = qkv(2, 4, 2, 11, 13, 64)
    check_against_reference(q, k, v, torch.bfloat16, attn_bias=torch.randn(1, 4, 11, 13).bfloat16())


def _dropout_seed(torch_seed):
    torch.manual_seed(torch_seed)
    return int(attention_module._new_seed())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dropout_matches_reference_with_the_same_mask(dtype):
    B, H, Hkv, T, S, D, p = 2, 4, 2, 37, 150, 64, 0.3
    q, k, v = qkv(B, H, Hkv, T, S, D)
    keep = reference.attention_dropout_keep(_dropout_seed(7), B, H, T, S, p)

    def ours(q, k, v, causal, dropout_keep, dropout_p):  # the seed replaces the explicit mask
        torch.manual_seed(7)
        return ops.attention(q, k, v, dropout_p=dropout_p, causal=causal)

    check(ours, reference.attention, NAMES, (q, k, v), (torch.randn(q.shape),), dtype, causal=True,
          dropout_keep=keep, dropout_p=p)


def test_dropout_is_reproducible_and_keeps_the_right_fraction():
    q, k, v = qkv(2, 4, 4, 64, 256, 32)
    torch.manual_seed(3)
    a = ops.attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(3)
    b = ops.attention(q, k, v, dropout_p=0.1)
    c = ops.attention(q, k, v, dropout_p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = reference.attention_dropout_keep(12345, 4, 8, 256, 1024, 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 2e-3
    torch.testing.assert_close(ops.attention(q, k, v, dropout_p=0.0), reference.attention(q, k, v))


def test_return_lse_is_the_logsumexp_of_the_logits():
    q, k, v = qkv(2, 4, 2, 17, 29, 64)
    mask = torch.rand(2, 29) > 0.3
    out, lse = ops.attention(q, k, v, key_padding_mask=mask, causal=True, return_lse=True)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8.0
    visible = torch.ones(17, 29, dtype=torch.bool).tril(12) & mask[:, None, None, :]
    ref = logits.masked_fill(~visible, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 17)
    torch.testing.assert_close(lse, ref)


def test_strided_bthd_views_are_read_in_place():
    B, T, H, D = 2, 9, 4, 64
    qkv_packed = torch.randn(B, T, 3, H, D)
    q, k, v = (qkv_packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, torch.float32, causal=True)


def test_gradcheck_float64():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, True, False]])
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: ops.attention(a, b, c, causal=True, key_padding_mask=mask, attn_bias=d), (q, k, v, bias))

    def dropped(a, b, c):
        torch.manual_seed(1)
        return ops.attention(a, b, c, dropout_p=0.4)

    assert torch.autograd.gradcheck(dropped, (q, k, v))


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 5, 7, 16))
    mask = torch.rand(2, 7) > 0.3
    bias = torch.randn(4, 5, 7)
    seed = torch.tensor(42)
    op = torch.ops.fastpt.attention.default
    torch.library.opcheck(op, (q, k, v, None, None, False, 0.25, 0.0, None))
    torch.library.opcheck(op, (q, k, v, mask, bias, True, 0.25, 0.2, seed))
    out, lse = op(q, k, v, mask, bias, True, 0.25, 0.2, seed)
    torch.library.opcheck(torch.ops.fastpt.attention_backward.default,
                          (torch.randn(q.shape), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, bias,
                           True, 0.25, 0.2, seed, True))


def test_torch_compile_fullgraph():
    mask = torch.rand(2, 12) > 0.2

    def f(q, k, v, dropout_p):
        out = ops.attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=dropout_p)
        return (out * 3).sum()

    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 12, 12, 32))
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v, 0.0)
    grads = torch.autograd.grad(out, (q, k, v))
    ref = f(q, k, v, 0.0)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v))):
        torch.testing.assert_close(a, b)
    # With dropout the graph draws its seed with the compiled RNG (not eager's stream): check
    # that it traces without a break and trains.
    grads = torch.autograd.grad(compiled(q, k, v, 0.1), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_empty_inputs():
    for shape_q, shape_kv in [((0, 2, 4, 8), (0, 2, 4, 8)), ((1, 2, 0, 8), (1, 2, 4, 8)), ((1, 2, 3, 8), (1, 2, 0, 8))]:
        q = torch.randn(shape_q, requires_grad=True)
        k, v = torch.randn(shape_kv, requires_grad=True), torch.randn(shape_kv, requires_grad=True)
        out = ops.attention(q, k, v)
        assert out.shape == q.shape and torch.all(out == 0)
        out.sum().backward()
        assert torch.all(q.grad == 0)


def _bad(**overrides):
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), TypeError, "q must be"),
        (dict(q=None), TypeError, "q must be a tensor, got NoneType"),
        (dict(v=[[1.0]]), TypeError, "v must be a tensor, got list"),
        (dict(k=torch.randn(2, 2, 7, 16, dtype=torch.float16)), TypeError, "k must have the dtype"),
        (dict(q=torch.randn(4, 5, 16)), ValueError, r"\(B, H, T, D\)"),
        (dict(q=torch.tensor(1.0)), ValueError, r"\(B, H, T, D\)"),
        (dict(v=torch.randn(2, 2, 8, 16)), ValueError, "same shape"),
        (dict(k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16)), ValueError, "multiple of the number"),
        (dict(k=torch.randn(3, 2, 7, 16), v=torch.randn(3, 2, 7, 16)), ValueError, "batch size"),
        (dict(k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8)), ValueError, "head dim of q"),
        (dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300), v=torch.randn(1, 1, 2, 300)),
         ValueError, "head dim D"),
        (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must be \(B, S\)"),
        (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be bool"),
        (dict(attn_bias=torch.randn(3, 5, 7)), ValueError, "attn_bias must broadcast"),
        (dict(attn_bias=torch.ones(5, 7, dtype=torch.long)), TypeError, "attn_bias must be a float"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(k=torch.randn(2, 2, 7, 16, device="meta"), v=torch.randn(2, 2, 7, 16, device="meta")),
         ValueError, "device"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        ops.attention(**_bad(**overrides))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backward_refuses_out_of_another_dtype(dtype):
    # The kernels read out as q's dtype: float64 was read as garbage, bfloat16 past its end.
    q, k, v = qkv(1, 2, 1, 5, 7, 16)
    out, lse = torch.ops.fastpt.attention(q, k, v, None, None, False, 0.25, 0.0, None)
    with pytest.raises(TypeError, match="out must have the dtype of q"):
        torch.ops.fastpt.attention_backward(torch.randn(q.shape), q, k, v, out.to(dtype), lse, None, None, False,
                                            0.25, 0.0, None, False)
