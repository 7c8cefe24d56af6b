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
    """CUDA result vs float64 reference (on CPU), eager CUDA as the low-precision yardstick.
    Tensor args and kwargs are given on the CPU and moved to the GPU for the CUDA runs."""
    cuda = lambda t: t.cuda()  # noqa: E731
    cuda_args = [cuda(a) if isinstance(a, torch.Tensor) else a for a in args]
    cuda_kwargs = {k: cuda(a) if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
    ours = run_with_grads(fn, [cuda(t) for t in diff_inputs], [cuda(g) for g in grads], dtype,
                          *cuda_args, **cuda_kwargs)
    eager = run_with_grads(ref, [cuda(t) for t in diff_inputs], [cuda(g) for g in grads], dtype,
                           *cuda_args, **cuda_kwargs)
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
    mask = torch.rand(2, S) > 0.3
    bias = torch.randn(4, T, S)
    _compare(ops.attention, reference.attention, ("out", "grad q", "grad k", "grad v"), (q, k, v),
             (torch.randn(q.shape),), dtype, causal=causal, key_padding_mask=mask, attn_bias=bias)


def test_attention_cuda_dropout_matches_cpu():
    q, k, v = (torch.randn(1, 2, 17, 32, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(3)
    cpu = ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    gpu = ops.attention(q.cuda(), k.cuda(), v.cuda(), dropout_p=0.3)
    torch.testing.assert_close(gpu.cpu(), cpu)


# bf16 / fp16 run on the tensor-core (WMMA) kernels: tiles of 32, D padded to a multiple of 16.
ATTN_NAMES = ("out", "grad q", "grad k", "grad v")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, T, S, D, causal", [
    (2, 8, 2, 130, 77, 64, True),    # GQA; causal with T > S: rows without keys
    (1, 4, 4, 64, 200, 128, True),   # causal with T < S (bottom-right), largest head dim
    (2, 4, 1, 33, 33, 40, False),    # MQA; D = 40 padded to 48
    (1, 2, 2, 97, 1025, 80, False),  # odd lengths, many key tiles
    (3, 2, 2, 1, 45, 64, True),      # decode step
])
def test_attention_wmma_cuda(B, H, Hkv, T, S, D, causal, dtype):
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = torch.rand(B, S) > 0.2
    mask[-1] = False  # a batch row without keys
    bias = torch.randn(H, T, S)
    _compare(ops.attention, reference.attention, ATTN_NAMES, (q, k, v), (torch.randn(q.shape),), dtype,
             causal=causal, key_padding_mask=mask, attn_bias=bias)
    out = ops.attention(q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype), causal=causal,
                        key_padding_mask=mask.cuda())
    assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu())), "a row without keys must give 0, not NaN"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_wmma_cuda_dropout_matches_reference_mask(dtype):
    B, H, Hkv, T, S, D, p = 2, 4, 2, 37, 150, 64, 0.3
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    torch.manual_seed(7)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))  # as fastpt.ops.attention draws it
    keep = reference.attention_dropout_keep(seed, B, H, T, S, p)

    def ours(q, k, v, causal, dropout_keep, dropout_p):  # the seed replaces the explicit mask
        torch.manual_seed(7)
        return ops.attention(q, k, v, causal=causal, dropout_p=dropout_p)

    _compare(ours, reference.attention, ATTN_NAMES, (q, k, v), (torch.randn(q.shape),), dtype, causal=True,
             dropout_keep=keep, dropout_p=p)


def test_attention_wmma_cuda_backward_is_deterministic():
    # No atomics: dQ, dK, dV are bitwise the same run to run (GQA: 4 query heads per kv head).
    q, dout = (torch.randn(2, 8, 200, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(ops.attention(*leaves, causal=True), leaves, dout)

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


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
