"""The fake kernels (FakeTensorMode, meta tensors, torch.compile, fake CUDA tensors) reject bad input
as the real ops do: the same exception type and message, never a wrong-shaped fake output."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastpt import ops
from ops_fake_util import (BF16, BOOL, F16, F32, F64, I8, I32, I64, OP, T, _attn_args, _attn_backward_args, _build,
                           _call, _int8_linear_args, _rope_args, _vi_dense_args, _vi_sparse_args)

pytestmark = pytest.mark.usefixtures("_quiet_fake_tensor_log")


def _raised(fn, args, mode) -> Exception:
    with pytest.raises(Exception) as info:
        _call(fn, args, mode)
    return info.value


# (id, op, args, exception type, a phrase of the real op's message)
BAD = [
    # swiglu
    ("swiglu-int", OP.swiglu, (T(4, dtype=I32), T(4, dtype=I32)), TypeError, "gate must be float32"),
    ("swiglu-up-dtype", OP.swiglu, (T(4), T(4, dtype=F64)), TypeError, "up must have the dtype of gate"),
    ("swiglu-shape", OP.swiglu, (T(4), T(5)), ValueError, "up must have the shape of gate"),
    ("swiglu_backward-grad-shape", OP.swiglu_backward, (T(5), T(4), T(4)), ValueError, "grad_out must have the shape"),
    ("swiglu_backward-grad-dtype", OP.swiglu_backward, (T(4, dtype=F64), T(4), T(4)), TypeError,
     "grad_out must have the dtype"),
    # rms_norm
    ("rms_norm-int", OP.rms_norm, (T(2, 4, dtype=I32), T(4, dtype=I32), 1e-6), TypeError, "x must be float32"),
    ("rms_norm-weight-dtype", OP.rms_norm, (T(2, 4), T(4, dtype=F64), 1e-6), TypeError, "weight must have the dtype"),
    ("rms_norm-scalar", OP.rms_norm, (T(), T(1), 1e-6), ValueError, "at least 1 dimension"),
    ("rms_norm-weight-shape", OP.rms_norm, (T(2, 4), T(1, 4), 1e-6), ValueError, r"weight must have shape \(4,\)"),
    ("rms_norm-eps-0", OP.rms_norm, (T(2, 4), T(4), 0.0), ValueError, "eps must be a positive finite number"),
    ("rms_norm-eps-nan", OP.rms_norm, (T(2, 4), T(4), float("nan")), ValueError, "eps must be a positive finite"),
    ("rms_norm_backward-grad-shape", OP.rms_norm_backward, (T(2, 5), T(2, 4), T(4), T(2)), ValueError,
     "grad_y must have the shape of x"),
    ("rms_norm_backward-rstd-dtype", OP.rms_norm_backward, (T(2, 4), T(2, 4), T(4), T(2, dtype=F64)), TypeError,
     "rstd must be Float"),
    ("rms_norm_backward-rstd-rows", OP.rms_norm_backward, (T(2, 4), T(2, 4), T(4), T(3)), ValueError,
     "rstd must have one value per row"),
    # rope (rope_backward and rope_ run the same checks)
    ("rope-int", OP.rope, _rope_args(q_dtype=I32), TypeError, "q must be float32"),
    ("rope-k-dtype", OP.rope, _rope_args(k_dtype=F64), TypeError, "k must have the dtype of q"),
    ("rope-1d", OP.rope, _rope_args(q=(8,), k=(8,)), ValueError, r"q and k must be \(\.\.\., T, D\)"),
    ("rope-T", OP.rope, _rope_args(k=(2, 1, 4, 8)), ValueError, "q and k must have the same T and D"),
    ("rope-batch", OP.rope, _rope_args(k=(3, 1, 5, 8)), ValueError, "same batch size"),
    ("rope-cos-int", OP.rope, _rope_args(cos_dtype=I32), TypeError, "cos must be float32"),
    ("rope-cos-f64", OP.rope, _rope_args(cos_dtype=F64), TypeError, "cos and sin must be float32 or the dtype of q"),
    ("rope-sin-shape", OP.rope, _rope_args(sin=(6, 3)), ValueError, "sin must have the shape of cos"),
    ("rope-R", OP.rope, _rope_args(cos=(6, 5)), ValueError, r"\(P, R\) tables with 1 <= R <= D/2"),
    ("rope-T>P", OP.rope, _rope_args(cos=(4, 4)), ValueError, "needs at least T rows"),
    ("rope-pos-float", OP.rope, _rope_args(pos=(5,), pos_dtype=F32), TypeError, "position_ids must be int64"),
    ("rope-pos-shape", OP.rope, _rope_args(pos=(3, 5)), ValueError, r"position_ids must be \(T,\) or \(B, T\)"),
    ("rope-pos-rows-2d", OP.rope, _rope_args(q=(2, 5, 8), k=(5, 8), pos=(2, 5)), ValueError,
     "need q and k both batched"),
    ("rope_backward-D", OP.rope_backward, _rope_args(k=(2, 1, 5, 6)), ValueError, "same T and D"),
    ("rope_-batch", OP.rope_, _rope_args(k=(3, 1, 5, 8)), ValueError, "same batch size"),
    ("rope_-same-tensor", OP.rope_, lambda d: [x := torch.ones(2, 3, 5, 8, device=d), x,
                                               *_build(_rope_args()[2:], d)], ValueError, "q and k share memory"),
    ("rope_-expanded", OP.rope_, (lambda d: torch.ones(1, 1, 5, 8, device=d).expand(2, 3, 5, 8),) + _rope_args()[1:],
     ValueError, "must not have elements that share memory"),
    # attention
    ("attention-int", OP.attention, _attn_args(dtype=I32), TypeError, "q must be float32"),
    ("attention-k-dtype", OP.attention, _attn_args(k_dtype=F64), TypeError, "k must have the dtype of q"),
    ("attention-3d", OP.attention, _attn_args(q=(4, 5, 8)), ValueError, r"q must be \(B, H, T, D\)"),
    ("attention-kv-shape", OP.attention, _attn_args(v=(2, 2, 7, 8)), ValueError, "k and v must have the same shape"),
    ("attention-batch", OP.attention, _attn_args(k=(3, 2, 6, 8)), ValueError, "batch size of q"),
    ("attention-head-dim", OP.attention, _attn_args(k=(2, 2, 6, 4)), ValueError, "head dim of q"),
    ("attention-heads", OP.attention, _attn_args(k=(2, 3, 6, 8)), ValueError, "must be a multiple of"),
    ("attention-D-300", OP.attention, _attn_args(q=(2, 4, 5, 300), k=(2, 2, 6, 300)), ValueError,
     r"head dim D must be in \[1, 256\]"),
    ("attention-D-0", OP.attention, _attn_args(q=(2, 4, 5, 0), k=(2, 2, 6, 0)), ValueError, "head dim D must be in"),
    ("attention-scale", OP.attention, _attn_args(scale=float("inf")), ValueError, "scale must be finite"),
    ("attention-dropout", OP.attention, _attn_args(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("attention-no-seed", OP.attention, _attn_args(dropout_p=0.1), ValueError, "needs dropout_seed"),
    ("attention-mask-dtype", OP.attention, _attn_args(mask=(2, 6), mask_dtype=F32), TypeError,
     "key_padding_mask must be bool"),
    ("attention-mask-shape", OP.attention, _attn_args(mask=(2, 5)), ValueError, r"key_padding_mask must be \(B, S\)"),
    ("attention-bias-dtype", OP.attention, _attn_args(bias=(4, 5, 6), bias_dtype=I32), TypeError,
     "attn_bias must be a float tensor"),
    ("attention-bias-shape", OP.attention, _attn_args(bias=(3, 5, 6)), ValueError, "attn_bias must broadcast"),
    ("attention-bias-5d", OP.attention, _attn_args(bias=(1, 2, 4, 5, 6)), ValueError, "attn_bias must broadcast"),
    ("attention_backward-heads", OP.attention_backward, _attn_backward_args(k=(2, 3, 6, 8)), ValueError,
     "must be a multiple of"),
    ("attention_backward-grad-shape", OP.attention_backward, _attn_backward_args(grad=(2, 4, 5, 7)), ValueError,
     "grad_out and out must have the shape of q"),
    ("attention_backward-lse", OP.attention_backward, _attn_backward_args(lse_dtype=F64), ValueError,
     r"lse must be the forward's \(B, H, T\) log-sum-exp"),
    ("attention_backward-bias-grad", OP.attention_backward, _attn_backward_args(bias_grad=True), ValueError,
     "bias_grad needs attn_bias"),
    # gemm
    ("gemm-1d", OP.gemm, (T(4), T(4, 5), False, False), ValueError, "a and b must be 2-D"),
    ("gemm-f16", OP.gemm, (T(3, 4, dtype=F16), T(4, 5, dtype=F16), False, False), TypeError,
     "a must be float32, bfloat16 or float64"),
    ("gemm-b-dtype", OP.gemm, (T(3, 4), T(4, 5, dtype=F64), False, False), TypeError, "b must have the dtype of a"),
    ("gemm-inner", OP.gemm, (T(3, 4), T(4, 5), True, False), ValueError, "inner dimensions differ"),
    ("gemm_into_-c-dtype", OP.gemm_into_, (T(3, 5, dtype=BF16), T(3, 4, dtype=BF16), T(4, 5, dtype=BF16), False,
                                           False, False), TypeError, "c must be Float for BFloat16 a and b"),
    ("gemm_into_-c-shape", OP.gemm_into_, (T(3, 6), T(3, 4), T(4, 5), False, False, False), ValueError,
     r"c must have shape \(3, 5\)"),
    ("gemm_into_-c-strided", OP.gemm_into_, (lambda d: torch.ones(5, 3, device=d).t(), T(3, 4), T(4, 5), False,
                                             False, False), ValueError, "c must be contiguous"),
    ("gemm_into_-c-alias", OP.gemm_into_, lambda d: [x := torch.ones(4, 4, device=d), x, T(4, 4).make(d), False,
                                                     False, False], ValueError, "c must not share memory with a or b"),
    # softmax_cross_entropy_
    ("xent-int", OP.softmax_cross_entropy_, (T(3, 5, dtype=I32), T(3, dtype=I64, fill=0), 1.0, -100, True),
     TypeError, "logits must be float32"),
    ("xent-1d", OP.softmax_cross_entropy_, (T(5), T(5, dtype=I64, fill=0), 1.0, -100, True), ValueError,
     "logits must be 2-D"),
    ("xent-stride", OP.softmax_cross_entropy_, (lambda d: torch.ones(5, 3, device=d).t(), T(3, dtype=I64, fill=0),
                                                1.0, -100, True), ValueError, "unit stride along classes"),
    ("xent-rows-overlap", OP.softmax_cross_entropy_, (lambda d: torch.ones(1, 5, device=d).expand(3, 5),
                                                      T(3, dtype=I64, fill=0), 1.0, -100, True), ValueError,
     "logits rows overlap"),
    ("xent-labels-dtype", OP.softmax_cross_entropy_, (T(3, 5), T(3, dtype=I32, fill=0), 1.0, -100, True), TypeError,
     "labels must be int64"),
    ("xent-labels-shape", OP.softmax_cross_entropy_, (T(3, 5), T(4, dtype=I64, fill=0), 1.0, -100, True), ValueError,
     r"labels must have shape \(3\)"),
    ("xent-no-classes", OP.softmax_cross_entropy_, (T(3, 0), T(3, dtype=I64, fill=-100), 1.0, -100, True),
     ValueError, "logits has no classes"),
    # int8
    ("quantize_rowwise-f64", OP.quantize_rowwise, (T(3, 5, dtype=F64), None), TypeError, "x must be float32"),
    ("quantize_rowwise-scalar", OP.quantize_rowwise, (T(), None), ValueError, "at least 1 dim"),
    ("quantize_rowwise-skip-dtype", OP.quantize_rowwise, (T(3, 5), T(5)), TypeError, "skip_cols must be bool"),
    ("quantize_rowwise-skip-shape", OP.quantize_rowwise, (T(3, 5), T(4, dtype=BOOL)), ValueError,
     r"skip_cols must have shape \(5\)"),
    ("outlier_columns-int", OP.outlier_columns, (T(3, 5, dtype=I32), 6.0), TypeError, "x must be float32"),
    ("outlier_columns-threshold", OP.outlier_columns, (T(3, 5), 0.0), ValueError, "threshold must be > 0"),
    ("int8_matmul-a-float", OP.int8_matmul, (T(3, 5), T(4, 5, dtype=I8), None, None, None, None), TypeError,
     "a must be int8"),
    ("int8_matmul-a-3d", OP.int8_matmul, (T(1, 3, 5, dtype=I8), T(4, 5, dtype=I8), None, None, None, None), ValueError,
     r"a must be 2-D \(M, K\)"),
    ("int8_matmul-b-1d", OP.int8_matmul, (T(3, 5, dtype=I8), T(5, dtype=I8), None, None, None, None), ValueError,
     r"b must be 2-D \(N, K\)"),
    ("int8_matmul-K", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 6, dtype=I8), None, None, None, None), ValueError,
     "same inner dim K"),
    ("int8_matmul-int32-scaled", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), T(3), T(4), I32, None),
     ValueError, "out_dtype int32 returns the exact integer sums"),
    ("int8_matmul-out-f64", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), T(3), T(4), F64, None), TypeError,
     "out_dtype must be int32, float32"),
    ("int8_matmul-no-scale", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), None, None, BF16, None),
     ValueError, "scale_a is required"),
    ("int8_matmul-scale-dtype", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), T(3, dtype=F64), T(4), None,
                                                 None), TypeError, "scale_a must be float32"),
    ("int8_matmul-scale-shape", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), T(3), T(3), None, None),
     ValueError, r"scale_b must have shape \(4\)"),
    ("int8_matmul-bias", OP.int8_matmul, (T(3, 5, dtype=I8), T(4, 5, dtype=I8), T(3), T(4), None, T(5)), ValueError,
     r"bias must have shape \(4\)"),
    ("int8_linear-f64", OP.int8_linear, _int8_linear_args(x_dtype=F64), TypeError, "x must be float32"),
    ("int8_linear-scalar", OP.int8_linear, _int8_linear_args(x=()), ValueError, "at least 1 dim"),
    ("int8_linear-out-features", OP.int8_linear, _int8_linear_args(n=0), ValueError, "out_features must be >= 1"),
    ("int8_linear-threshold", OP.int8_linear, _int8_linear_args(threshold=0.0), ValueError, "threshold must be > 0"),
    ("int8_linear-K-0", OP.int8_linear, _int8_linear_args(x=(3, 0)), ValueError,
     r"in_features must be in \[1, 2\^17\)"),
    ("int8_linear-packed-dtype", OP.int8_linear, _int8_linear_args(packed_dtype=F32), TypeError,
     "weight_packed must be int8"),
    ("int8_linear-packed-n", OP.int8_linear, _int8_linear_args(n=70, scale=(70,)), ValueError,
     r"weight_packed must be the packed \(70, 70\) weight"),
    ("int8_linear-in-features", OP.int8_linear, _int8_linear_args(x=(3, 200)), ValueError,
     "does x's last dim match in_features"),
    ("int8_linear-colsum-dtype", OP.int8_linear, _int8_linear_args(colsum_dtype=I64), TypeError,
     "weight_colsum must be int32"),
    ("int8_linear-colsum-shape", OP.int8_linear, _int8_linear_args(colsum=(40,)), ValueError,
     r"weight_colsum must have shape \(64\)"),
    ("int8_linear-packed-strided", OP.int8_linear,
     (T(3, 70), lambda d: torch.zeros(4, 16, 32, 4, dtype=I8, device=d).transpose(1, 2)) + _int8_linear_args()[2:],
     ValueError, "must be contiguous"),
    ("int8_linear-scale-dtype", OP.int8_linear, _int8_linear_args(scale_dtype=F64), TypeError,
     "weight_scale must be float32"),
    ("int8_linear-scale-shape", OP.int8_linear, _int8_linear_args(scale=(64,)), ValueError,
     r"weight_scale must have shape \(40\)"),
    ("int8_linear-bias", OP.int8_linear, _int8_linear_args(bias=(41,)), ValueError, r"bias must have shape \(40\)"),
    ("hash_dropout-int", OP.hash_dropout, (T(4, dtype=I32), 0.5, T(dtype=I64)), TypeError, "x must be float32"),
    ("hash_dropout-p", OP.hash_dropout, (T(4), 1.0, T(dtype=I64)), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("hash_dropout-seed", OP.hash_dropout, (T(4), 0.5, None), ValueError, "dropout needs a seed"),
    # value iteration
    ("vi_dense-reward-int", OP.value_iteration_dense, _vi_dense_args(reward_dtype=I32), TypeError,
     "reward must be float32 or float64"),
    ("vi_dense-v-dtype", OP.value_iteration_dense, _vi_dense_args(v_dtype=F64), TypeError, "v must have the dtype"),
    ("vi_dense-reward-1d", OP.value_iteration_dense, _vi_dense_args(reward=(3,)), ValueError,
     r"reward must have shape \(states, actions\)"),
    ("vi_dense-no-actions", OP.value_iteration_dense, _vi_dense_args(p=(0, 3, 3), reward=(3, 0)), ValueError,
     "actions >= 1"),
    ("vi_dense-v-2d", OP.value_iteration_dense, _vi_dense_args(v=(3, 1)), ValueError, "v must be 1-D"),
    ("vi_dense-gamma", OP.value_iteration_dense, _vi_dense_args(gamma=1.5), ValueError, r"gamma must be in \(0, 1\]"),
    ("vi_dense-sweeps", OP.value_iteration_dense, _vi_dense_args(sweeps=0), ValueError, "sweeps must be >= 1"),
    ("vi_dense-tol", OP.value_iteration_dense, _vi_dense_args(tol=float("nan")), ValueError, "tol must not be NaN"),
    ("vi_dense-first-state", OP.value_iteration_dense, _vi_dense_args(p=(2, 2, 4), reward=(2, 2), v=(4,),
                                                                      first_state=3), ValueError,
     "must lie within the 4 states of v"),
    ("vi_dense-partition-sweeps", OP.value_iteration_dense, _vi_dense_args(p=(2, 2, 4), reward=(2, 2), v=(4,),
                                                                           sweeps=2, first_state=1), ValueError,
     "sweeps > 1 needs the whole MDP"),
    ("vi_dense-p-dtype", OP.value_iteration_dense, _vi_dense_args(dtype=F64, reward_dtype=F32, v_dtype=F32),
     TypeError, "p must have the dtype of reward"),
    ("vi_dense-p-shape", OP.value_iteration_dense, _vi_dense_args(p=(2, 3, 4)), ValueError,
     r"p must have shape \(actions, states, num_states\)"),
    ("vi_sparse-indptr-dtype", OP.value_iteration_sparse, _vi_sparse_args(indptr_dtype=F32), TypeError,
     "indptr must be int32 or int64"),
    ("vi_sparse-indices-2d", OP.value_iteration_sparse, _vi_sparse_args(indices=(1, 1)), ValueError,
     "indices must be 1-D"),
    ("vi_sparse-values-dtype", OP.value_iteration_sparse, _vi_sparse_args(values_dtype=F64), TypeError,
     "values must have the dtype of reward"),
    ("vi_sparse-values-shape", OP.value_iteration_sparse, _vi_sparse_args(values=(2,)), ValueError,
     "one probability per index"),
    ("vi_sparse-indptr-length", OP.value_iteration_sparse, _vi_sparse_args(indptr=(5,)), ValueError,
     r"indptr must have states \* actions \+ 1 = 7 entries"),
]


@pytest.mark.parametrize("op, args, error, match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_fake_and_meta_reject_bad_input_as_the_real_op(op, args, error, match):
    real = _raised(op, args, "real")
    assert type(real) is error and re.search(match, str(real)), repr(real)
    for mode in ("fake", "meta"):
        got = _raised(op, args, mode)
        assert (type(got), str(got)) == (type(real), str(real)), mode


@pytest.mark.parametrize("fn, args, match", [
    (ops.swiglu, (T(4), T(5)), "up must have the shape of gate"),
    (lambda q, k, v: ops.attention(q, k, v), (T(2, 4, 5, 8), T(2, 3, 5, 8), T(2, 3, 5, 8)), "must be a multiple of"),
], ids=["swiglu", "attention"])
def test_compile_fullgraph_reports_the_real_error(fn, args, match):
    tensors = _build(args, "cpu")
    with pytest.raises(ValueError, match=match) as real:
        fn(*tensors)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with pytest.raises(Exception) as traced:
        compiled(*tensors)
    # Dynamo wraps the fake kernel's error, naming its type and message.
    assert f"ValueError({str(real.value)!r})" in str(traced.value)


@pytest.mark.parametrize("op, args, match", [
    (OP.attention, _attn_args(q=(1, 2, 3, 200), k=(1, 2, 4, 200)), "head dim D must be at most 128 on CUDA"),
    (OP.value_iteration_dense, _vi_dense_args()[:5] + (True,) + _vi_dense_args()[6:], "gauss_seidel=True is CPU only"),
], ids=["attention-head-dim", "value_iteration-gauss-seidel"])
def test_fake_cuda_tensors_meet_the_cuda_glue_limits(op, args, match):
    # Fake CUDA tensors need no GPU: what the CUDA glue refuses beyond the shared checks.
    with FakeTensorMode(), pytest.raises(ValueError, match=match):
        op(*_build(args, "cuda"))
