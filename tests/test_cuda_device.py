"""The CUDA kernels on a real GPU, against the CPU kernels and the float64 reference.

Marked ``cuda``: excluded by default, run with ``pytest -m cuda`` on a machine with a GPU
and a CUDA build of fastpt. Without one every test here is skipped, and says why.
"""

from __future__ import annotations

import pytest
import torch

import fastpt
from fastpt import ops
from fastpt.ops import reference
from reference_check import run_with_grads
from tolerances import assert_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not fastpt.build_info()["cuda"], reason="fastpt was built without CUDA kernels"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (7, 3), (97, 13), (1025, 4097), (3, 8192)]


def _compare(fn, ref, names, diff_inputs, grads, dtype, *args, **kwargs):
    """CUDA result vs float64 reference (on CPU), eager CUDA as the low-precision yardstick."""
    cuda = lambda t: t.cuda()  # noqa: E731
    ours = run_with_grads(fn, [cuda(t) for t in diff_inputs], [cuda(g) for g in grads], dtype,
                          *[cuda(a) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    eager = run_with_grads(ref, [cuda(t) for t in diff_inputs], [cuda(g) for g in grads], dtype,
                           *[cuda(a) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    ref64 = run_with_grads(ref, diff_inputs, grads, torch.float64, *args, **kwargs)
    n_out = len(ours) - len(diff_inputs)
    for i, (name, a, r, e) in enumerate(zip(names, ours, ref64, eager)):
        assert a.is_cuda and a.dtype == dtype
        assert_close(a.cpu(), r, dtype, "fwd" if i < n_out else "bwd", eager=e.cpu(), what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_cuda(shape, dtype):
    x, w, dy = torch.randn(shape), 1 + 0.5 * torch.randn(shape[-1]), torch.randn(shape)
    _compare(ops.rms_norm, reference.rms_norm, ("y", "grad x", "grad w"), (x, w), (dy,), dtype, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_cuda(shape, dtype):
    g, u, d = 4 * torch.randn(shape), torch.randn(shape), torch.randn(shape)
    _compare(ops.swiglu, reference.swiglu, ("out", "grad gate", "grad up"), (g, u), (d,), dtype)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (80, 32), (6, 6)])
def test_rope_cuda(head_dim, rotary_dim, dtype, layout):
    q, k = torch.randn(2, 4, 9, head_dim), torch.randn(2, 2, 9, head_dim)
    cos, sin = reference.rope_tables(16, rotary_dim, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    pos = torch.stack([torch.arange(9), torch.arange(5, 14)])
    grads = (torch.randn(q.shape), torch.randn(k.shape))
    _compare(ops.rope, reference.rope, ("q", "k", "grad q", "grad k"), (q, k), grads, dtype, cos, sin, pos,
             layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, S, D, causal", [(1, 45, 64, True), (19, 37, 40, False), (97, 97, 128, True),
                                             (33, 9, 80, True)])
def test_attention_cuda(T, S, D, causal, dtype):
    q, k, v = torch.randn(2, 4, T, D), torch.randn(2, 2, S, D), torch.randn(2, 2, S, D)
    mask = (torch.rand(2, S) > 0.3).cuda()
    bias = torch.randn(4, T, S).cuda()
    _compare(ops.attention, reference.attention, ("out", "grad q", "grad k", "grad v"), (q, k, v),
             (torch.randn(q.shape),), dtype, causal=causal, key_padding_mask=mask, attn_bias=bias)


def test_attention_cuda_dropout_matches_cpu():
    q, k, v = (torch.randn(1, 2, 17, 32, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(3)
    cpu = ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    gpu = ops.attention(q.cuda(), k.cuda(), v.cuda(), dropout_p=0.3)
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_cuda_and_cpu_inputs_mixed_is_an_error():
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.rms_norm(torch.randn(4, 8, device="cuda"), torch.ones(8), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse", [True, False])
def test_value_iteration_cuda(sparse, dtype):
    from fastpt import mdp as M
    m = M.random_sparse_mdp(3001, 4, 40, seed=1, gamma=0.9, dtype=dtype)
    if sparse:
        t_cpu = m.transitions()
    else:
        S, A = m.num_states, m.num_actions
        rows = torch.repeat_interleave(torch.arange(S * A), (m.indptr[1:] - m.indptr[:-1]).long())
        p = torch.zeros(A, S, S, dtype=dtype)
        p.index_put_((rows % A, rows // A, m.indices.long()), m.values, accumulate=True)
        t_cpu = p
    move = (lambda t: tuple(x.cuda() for x in t)) if sparse else (lambda t: t.cuda())
    v = torch.randn(m.num_states, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for kwargs in ({}, {"sweeps": 5, "return_q": True}, {"sweeps": 50, "tol": 1e-2}):
        want = ops.value_iteration(t_cpu, m.reward, v, 0.9, **kwargs)
        got = ops.value_iteration(move(t_cpu), m.reward.cuda(), v.cuda(), 0.9, **kwargs)
        torch.testing.assert_close(got.v.cpu(), want.v, rtol=tol, atol=tol)
        torch.testing.assert_close(got.dv.cpu(), want.dv, rtol=tol, atol=tol, equal_nan=True)
        if kwargs.get("return_q"):
            torch.testing.assert_close(got.q.cpu(), want.q, rtol=tol, atol=tol)
        if dtype == torch.float64:
            assert torch.equal(got.policy.cpu(), want.policy)
    with pytest.raises(ValueError, match="CPU only"):
        ops.value_iteration(move(t_cpu), m.reward.cuda(), v.cuda(), 0.9, gauss_seidel=True)


# ---------------------------------------------------------------- int8 and LoRA

@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (33, 70, 65), (300, 1025, 200)])
def test_int8_matmul_cuda_matches_cpu_exactly(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(ops.int8_matmul(a.cuda(), b.cuda()).cpu(), ops.int8_matmul(a, b))
    sa, sb, bias = torch.rand(m), torch.rand(n), torch.randn(n)
    out = ops.int8_matmul(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(), torch.bfloat16, bias.cuda())
    torch.testing.assert_close(out.cpu(), ops.int8_matmul(a, b, sa, sb, torch.bfloat16, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_quantize_and_linear_cuda(dtype):
    x = torch.randn(37, 300).to(dtype)
    x[:, 5] = 30
    q, s = ops.quantize_rowwise(x.cuda(), ops.outlier_columns(x.cuda()))
    q_cpu, s_cpu = ops.quantize_rowwise(x, ops.outlier_columns(x))
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(s.cpu(), s_cpu)
    layer = fastpt.nn.Int8Linear.from_linear(torch.nn.Linear(300, 70))
    out = layer.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), layer.cpu()(x), rtol=1e-2, atol=1e-2)


def test_lora_linear_cuda_dropout_mask_matches_cpu():
    x, w = torch.randn(64, 50), torch.randn(30, 50)
    a, b = torch.randn(4, 50), torch.randn(30, 4)
    torch.manual_seed(3)
    out = ops.lora_linear(x.cuda(), w.cuda(), a.cuda(), b.cuda(), 0.5, dropout_p=0.2)
    torch.manual_seed(3)
    torch.testing.assert_close(out.cpu(), ops.lora_linear(x, w, a, b, 0.5, dropout_p=0.2), rtol=1e-4, atol=1e-4)
