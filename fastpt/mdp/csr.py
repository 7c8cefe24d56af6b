"""An MDP's inputs as checked tensors: arrays, index arrays, and sparse transitions as state-major CSR."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x, dtype=None) -> Tensor:
    if isinstance(x, Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _check_real(name: str, t: Tensor) -> Tensor:
    """t, refusing complex values: the cast to float would keep only their real part."""
    if t.dtype.is_complex:
        raise TypeError(f"{name} must be real, got {t.dtype}")
    return t


def _check_probability_dtype(name: str, t: Tensor) -> None:
    """Probabilities are floats or integers (0/1 for deterministic moves); a bool matrix is
    more likely an adjacency mask than a distribution."""
    _check_real(name, t)
    if t.dtype == torch.bool:
        raise TypeError(f"{name} must hold probabilities (floating point or integer), got {t.dtype}")


def _index_array(name: str, x) -> Tensor:
    """``x`` as int64, refusing floats (1.9 would silently become successor 1) and bools."""
    t = _as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


def _is_sparse_matrix(x) -> bool:
    return (isinstance(x, Tensor) and x.layout in (torch.sparse_csr, torch.sparse_coo)) or \
        hasattr(x, "tocsr")


def _check_indptr(indptr: Tensor, nnz: int, where: str = "") -> None:
    """Row pointers non-decreasing and within the ``nnz`` nonzeros (``where`` prefixes the error)."""
    if bool((indptr[1:] < indptr[:-1]).any()) or int(indptr[0]) < 0 or int(indptr[-1]) > nnz:
        raise ValueError(f"{where}indptr must be non-decreasing and within its {nnz} nonzeros")


def _csr_parts(m, name: str) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """(indptr int64, indices int64, values, shape) of a torch sparse tensor or scipy matrix,
    whose arrays are checked: neither library guarantees them (an unvalidated
    torch.sparse_csr_tensor, a scipy matrix whose arrays were assigned)."""
    if isinstance(m, Tensor):
        if m.layout == torch.sparse_coo:
            m = m.coalesce().to_sparse_csr()
        ip, ix, val = m.crow_indices().to(torch.int64), m.col_indices().to(torch.int64), m.values()
    else:
        m = m.tocsr()
        ip, ix, val = (torch.from_numpy(np.asarray(a, dtype=dt)) for a, dt in
                       ((m.indptr, np.int64), (m.indices, np.int64), (m.data, None)))
    shape = tuple(m.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D sparse matrix, got shape {shape}")
    if ip.dim() != 1 or ip.numel() != shape[0] + 1 or ix.shape != val.shape:
        raise ValueError(f"{name}: its CSR arrays do not fit its shape {shape} (indptr of {ip.numel()} "
                         f"entries, {ix.numel()} indices, {val.numel()} values)")
    _check_indptr(ip, ix.numel(), f"{name}: ")
    used = ix[int(ip[0]):int(ip[-1])]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= shape[1]):
        raise ValueError(f"{name}: column indices must be in [0, {shape[1]}), got values in "
                         f"[{int(used.min())}, {int(used.max())}]")
    return ip, ix, val, shape


def _stack_action_major(parts) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenates per-action CSRs (each S x S) into one action-major CSR of A*S rows."""
    indptrs, indices, values, offset = [], [], [], 0
    for i, (ip, ix, val, _) in enumerate(parts):
        indptrs.append(ip[:-1] - ip[0] + offset if i < len(parts) - 1 else ip - ip[0] + offset)
        indices.append(ix[int(ip[0]):int(ip[-1])])
        values.append(val[int(ip[0]):int(ip[-1])])
        offset += int(ip[-1] - ip[0])
    return torch.cat(indptrs), torch.cat(indices), torch.cat(values)


def _gather_rows(indptr: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """A CSR with rows ``order`` of the given one: (new indptr, index of each new nonzero in
    the old arrays). Vectorised, O(rows + nnz)."""
    counts = (indptr[1:] - indptr[:-1])[order]
    new_indptr = torch.zeros(order.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=new_indptr[1:])
    nnz = int(new_indptr[-1])
    shift = torch.repeat_interleave(indptr[:-1][order] - new_indptr[:-1], counts, output_size=nnz)
    return new_indptr, torch.arange(nnz, dtype=torch.int64) + shift


def _sparse_to_state_major(x) -> tuple[Tensor, Tensor, Tensor, int, int] | None:
    """(indptr, indices, values, S, A) in state-major row order from a stacked action-major
    sparse (A*S, S) matrix or a sequence of per-action (S, S) matrices; None if x is dense."""
    if _is_sparse_matrix(x):
        ip, ix, val, shape = _csr_parts(x, "the stacked sparse matrix")
        if len(shape) != 2 or shape[1] == 0 or shape[0] % shape[1]:
            raise ValueError(f"a stacked sparse matrix must have shape (A*S, S), got {shape}")
        S, A = shape[1], shape[0] // shape[1]
    elif isinstance(x, (list, tuple)) and x and any(_is_sparse_matrix(t) for t in x):
        parts = [_csr_parts(t if _is_sparse_matrix(t) else _as_tensor(t).to_sparse_csr(), f"matrix {a}")
                 for a, t in enumerate(x)]
        S, A = parts[0][3][0], len(parts)
        for a, part in enumerate(parts):
            if part[3] != (S, S):
                raise ValueError(f"matrix {a} of the sequence must have shape ({S}, {S}), got {part[3]}")
        ip, ix, val = _stack_action_major(parts)
    else:
        return None
    if S < 1 or A < 1:
        raise ValueError(f"an MDP needs at least one state and one action, got S={S}, A={A}")
    order = torch.arange(S * A).view(A, S).t().reshape(-1)  # row a*S + s -> s*A + a
    ip = ip - ip[0]
    indptr, take = _gather_rows(ip, order)
    return indptr, ix[take], val[take], S, A
