"""Tensors built on a chosen device, and argument sets of the fastpt ops, for the fake-kernel tests."""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

OP = torch.ops.fastpt
F32, F64, BF16, F16, I8, I32, I64, BOOL = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8,
                                           torch.int32, torch.int64, torch.bool)


class T:
    """A tensor to build on a given device: T(2, 3), T(4, dtype=I8), T(2, 3, fill=0)."""

    def __init__(self, *shape, dtype=F32, fill=1):
        self.shape, self.dtype, self.fill = shape, dtype, fill

    def make(self, device):
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)


def _build(args, device):
    """The arguments on device: args is a sequence of T, functions of the device and other
    values, or one function of the device returning them all (for aliased tensors)."""
    if callable(args):
        return args(device)
    return [a.make(device) if isinstance(a, T) else a(device) if callable(a) else a for a in args]


def _call(fn, args, mode):
    """fn(*args) with the tensors of args built as CPU tensors ("real"), fake CPU tensors
    under FakeTensorMode ("fake") or meta tensors ("meta")."""
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        return fn(*_build(args, "meta" if mode == "meta" else "cpu"))


def _rope_args(q=(2, 3, 5, 8), k=(2, 1, 5, 8), cos=(6, 4), sin=None, q_dtype=F32, k_dtype=None, cos_dtype=F32,
               sin_dtype=None, pos=None, pos_dtype=I64):
    return (T(*q, dtype=q_dtype), T(*k, dtype=k_dtype or q_dtype), T(*cos, dtype=cos_dtype),
            T(*(sin or cos), dtype=sin_dtype or cos_dtype), None if pos is None else T(*pos, dtype=pos_dtype, fill=0),
            False)


def _attn_args(q=(2, 4, 5, 8), k=(2, 2, 6, 8), v=None, dtype=F32, k_dtype=None, mask=None, mask_dtype=BOOL,
               bias=None, bias_dtype=F32, scale=1.0, dropout_p=0.0, seed=None):
    return (T(*q, dtype=dtype), T(*k, dtype=k_dtype or dtype), T(*(v or k), dtype=dtype),
            None if mask is None else T(*mask, dtype=mask_dtype), None if bias is None else T(*bias, dtype=bias_dtype),
            False, scale, dropout_p, seed)


def _attn_backward_args(grad=(2, 4, 5, 8), out=(2, 4, 5, 8), lse=(2, 4, 5), lse_dtype=F32, bias=None,
                        bias_grad=False, **kw):
    q, k, v, mask, b, causal, scale, p, seed = _attn_args(bias=bias, **kw)
    return (T(*grad), q, k, v, T(*out), T(*lse, dtype=lse_dtype), mask, b, causal, scale, p, seed, bias_grad)


def _int8_linear_args(x=(3, 70), x_dtype=F32, packed=(4, 32, 16, 4), packed_dtype=I8, colsum=(64,), colsum_dtype=I32,
                      scale=(40,), scale_dtype=F32, n=40, bias=None, bias_dtype=F32, threshold=6.0):
    return (T(*x, dtype=x_dtype), T(*packed, dtype=packed_dtype, fill=0), T(*colsum, dtype=colsum_dtype, fill=0),
            T(*scale, dtype=scale_dtype), n, None if bias is None else T(*bias, dtype=bias_dtype), threshold)


def _vi_dense_args(p=(2, 3, 3), reward=(3, 2), v=(3,), dtype=F32, reward_dtype=None, v_dtype=None, gamma=0.9, sweeps=1,
                   tol=0.0, first_state=0):
    return (T(*p, dtype=dtype, fill=0), T(*reward, dtype=reward_dtype or dtype, fill=0),
            T(*v, dtype=v_dtype or dtype, fill=0), gamma, sweeps, False, False, tol, False, first_state)


def _vi_sparse_args(indptr=(7,), indptr_dtype=I64, indices=(1,), indices_dtype=I64, values=None, values_dtype=F32):
    return (T(*indptr, dtype=indptr_dtype, fill=0), T(*indices, dtype=indices_dtype, fill=0),
            T(*(values or indices), dtype=values_dtype, fill=0), T(3, 2, fill=0), T(3, fill=0), 0.9, 1, False,
            False, 0.0, False, 0)
