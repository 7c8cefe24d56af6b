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
