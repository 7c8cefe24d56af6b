"""Valid input: the fake kernels' outputs, and the public functions' on meta tensors, have the
shapes and dtypes of the real ops' outputs."""

from __future__ import annotations

import pytest
import torch

from fastpt import ops
from ops_fake_util import (BF16, I8, I64, OP, T, _attn_args, _attn_backward_args, _build, _call, _int8_linear_args,
                           _rope_args, _vi_dense_args, _vi_sparse_args)

pytestmark = pytest.mark.usefixtures("_quiet_fake_tensor_log")


def _packed_weight(out_features=40, in_features=70):
    return ops.pack_int8_weight(torch.ones(out_features, in_features, dtype=I8))


# Valid inputs the checks must not refuse (the fake kernel's outputs against the real op's).
GOOD = [
    ("rope-position-rows", OP.rope, _rope_args(pos=(2, 5))),
    ("rope-6d", OP.rope, _rope_args(q=(2, 1, 1, 3, 5, 8))),
    ("rope_-packed-qkv", OP.rope_, lambda d: [*_qkv(d), *_build(_rope_args()[2:], d)]),
    ("attention-mask-bias", OP.attention, _attn_args(mask=(2, 6), bias=(4, 1, 6))),
    ("attention_backward-bias", OP.attention_backward, _attn_backward_args(bias=(4, 5, 6), bias_grad=True)),
    ("gemm_into_-bf16", OP.gemm_into_, (T(3, 5), T(4, 3, dtype=BF16), T(4, 5, dtype=BF16), True, False, True)),
    ("xent-no-rows", OP.softmax_cross_entropy_, (T(0, 0), T(0, dtype=I64), 1.0, -100, True)),
    ("int8_matmul-int32", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), None, None, None, None)),
    ("int8_linear", OP.int8_linear, _int8_linear_args(bias=(40,))),
    ("vi_dense-partition", OP.value_iteration_dense, _vi_dense_args(p=(2, 2, 4), reward=(2, 2), v=(4,), first_state=2)),
    ("vi_sparse", OP.value_iteration_sparse, _vi_sparse_args()),
]


def _qkv(device):
    # q and k: disjoint strided views of one packed (B, T, 3, H, D) projection.
    qkv = torch.zeros(2, 5, 3, 3, 8, device=device)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)


def _meta(out):
    return [(tuple(t.shape), t.dtype) for t in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("op, args", [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_fake_and_meta_accept_valid_input(op, args):
    real = _meta(_call(op, args, "real"))
    for mode in ("fake", "meta"):
        assert _meta(_call(op, args, mode)) == real, mode


def _public_calls():
    packed, colsum = _packed_weight()
    return [
        ("attention", lambda d: ops.attention(*_build(_attn_args(), d)[:3], causal=True, return_lse=True)),
        ("rms_norm", lambda d: ops.rms_norm(T(2, 3, 8).make(d), T(8).make(d))),
        ("swiglu", lambda d: ops.swiglu(T(2, 8).make(d), T(2, 8).make(d))),
        ("rope", lambda d: ops.rope(*_build(_rope_args(pos=(5,)), d)[:5], layout="interleaved")),
        ("rope_", lambda d: ops.rope_(*_build(_rope_args(), d)[:5])),
        ("gemm", lambda d: ops.gemm(T(3, 4).make(d), T(5, 4).make(d), trans_b=True)),
        ("gemm_into_", lambda d: ops.gemm_into_(T(3, 5).make(d), T(3, 4).make(d), T(4, 5).make(d), accumulate=True)),
        ("linear", lambda d: ops.linear(T(2, 3, 4).make(d), T(5, 4).make(d), T(5).make(d))),
        ("cross_entropy", lambda d: ops.cross_entropy(T(3, 5).make(d), T(3, dtype=I64, fill=0).make(d))),
        ("softmax_cross_entropy_", lambda d: ops.softmax_cross_entropy_(T(3, 5).make(d),
                                                                        T(3, dtype=I64, fill=0).make(d))),
        ("quantize_rowwise", lambda d: ops.quantize_rowwise(T(2, 3, 5).make(d))),
        ("quantize_weight", lambda d: ops.quantize_weight(T(4, 5).make(d))),
        ("dequantize_rowwise", lambda d: ops.dequantize_rowwise(T(3, 5, dtype=I8).make(d), T(3).make(d))),
        ("outlier_columns", lambda d: ops.outlier_columns(T(3, 5).make(d))),
        ("pack_int8_weight", lambda d: ops.pack_int8_weight(T(40, 70, dtype=I8).make(d))),
        ("unpack_int8_weight", lambda d: ops.unpack_int8_weight(packed.to(d), 40, 70)),
        ("int8_matmul", lambda d: ops.int8_matmul(T(3, 5, dtype=I8).make(d), T(4, 5, dtype=I8).make(d), T(3).make(d),
                                                  T(4).make(d), bias=T(4).make(d))),
        ("int8_linear", lambda d: ops.int8_linear(T(2, 3, 70).make(d), packed.to(d), colsum.to(d), T(40).make(d), 40)),
        ("lora_linear", lambda d: ops.lora_linear(T(2, 3, 8).make(d), T(6, 8).make(d), T(2, 8).make(d),
                                                  T(6, 2).make(d), 2.0, T(6).make(d), dropout_p=0.1)),
        ("value_iteration-dense", lambda d: ops.value_iteration(T(2, 3, 3, fill=0).make(d), T(3, 2).make(d),
                                                                T(3).make(d), 0.9, sweeps=2, return_q=True)),
        ("value_iteration-sparse", lambda d: ops.value_iteration(
            (torch.arange(7, device=d), torch.tensor([0, 1, 2, 0, 1, 2], device=d), T(6).make(d)), T(3, 2).make(d),
            T(3).make(d), 0.9)),
    ]


@pytest.mark.parametrize("name", [name for name, _ in _public_calls()])
def test_public_functions_on_meta_tensors(name):
    call = dict(_public_calls())[name]
    with torch.no_grad():
        assert _meta(call("meta")) == _meta(call("cpu"))
