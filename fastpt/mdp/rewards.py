"""R(s, a) of an MDP from the rewards it takes: R(s), R(s, a), or R(s, a, s') dense or sparse."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.mdp.csr import _as_tensor, _check_real, _is_sparse_matrix, _sparse_to_state_major


class _PerNonzero:
    """R(s, a, s') given per nonzero of the transition CSR (state-major order)."""

    def __init__(self, values: Tensor):
        self.values = values


class RewardMixin:
    """The reduction of an :class:`~fastpt.mdp.model.MDP`'s reward to R(s, a) (S, A) float64,
    against its transitions (dense ``p`` or the state-major CSR)."""

    def _reduce_reward(self, reward) -> Tensor:
        S, A = self.num_states, self.num_actions
        if _is_sparse_matrix(reward) and tuple(reward.shape) == (S, A) and (S, A) != (A * S, S):
            # R(s, a) stored sparse (not the (A*S, S) layout of an R(s, a, s')): O(S*A) dense
            reward = reward.to_dense() if isinstance(reward, Tensor) else reward.toarray()
        sparse = _sparse_to_state_major(reward) if not isinstance(reward, _PerNonzero) else None
        if sparse is not None:
            if self.p is not None:
                raise ValueError("a sparse R(s, a, s') needs sparse transitions; give a dense "
                                 "(A, S, S) reward with dense transitions")
            indptr, indices, values, S_r, A_r = sparse
            if (S_r, A_r) != (S, A):
                raise ValueError(f"a sparse R(s, a, s') must have the shape of the transitions ({A} "
                                 f"actions of {S} states), got {A_r} actions of {S_r} states")
            values = _check_real("reward", values).to(torch.float64)
            if torch.equal(indptr, self.indptr) and torch.equal(indices, self.indices):
                reward = _PerNonzero(values)
            else:
                reward = self._reduce_sparse_reward(indptr, indices, values).view(S, A)
        if isinstance(reward, _PerNonzero):
            self._check_finite_per_entry(self.indptr, self.indices, reward.values)
            r = self._row_sums(self.values.to(torch.float64) * reward.values).view(S, A)
        else:
            r = _check_real("reward", _as_tensor(reward)).to(torch.float64)
        if isinstance(reward, _PerNonzero):
            pass
        elif r.dim() == 1 and r.shape[0] == S:
            r = r.unsqueeze(1).expand(S, A)
        elif r.dim() == 2 and tuple(r.shape) == (S, A):
            pass
        elif r.dim() == 3 and tuple(r.shape) == (A, S, S):
            bad = (~torch.isfinite(r)).nonzero()
            if len(bad):  # before P * R, where an inf under P = 0 would read as NaN
                a, s, s2 = (int(i) for i in bad[0])
                raise ValueError(f"R(s'={s2} | state {s}, action {a}) is {float(r[a, s, s2])}: rewards "
                                 "must be finite")
            if self.p is not None:
                r = (self.p.to(torch.float64) * r).sum(-1).t()
            else:
                rows = torch.repeat_interleave(torch.arange(S * A), self.indptr[1:] - self.indptr[:-1],
                                               output_size=self.indices.numel())
                rv = r[rows % A, rows // A, self.indices.to(torch.int64)]
                r = self._row_sums(self.values.to(torch.float64) * rv).view(S, A)
        else:
            raise ValueError(f"reward must have shape ({S},), ({S}, {A}) or ({A}, {S}, {S}), got "
                             f"{tuple(r.shape)}")
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            s, a = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"reward of state {s}, action {a} is {float(r[s, a])}: rewards must be finite")
        return r.to(self.dtype).contiguous()

    def _check_finite_per_entry(self, indptr: Tensor, indices: Tensor, values: Tensor) -> None:
        """Rewards of a state-major CSR R(s, a, s'), each finite, or ValueError naming the
        first that is not: checked before P * R, where an inf under P = 0 would read as NaN."""
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            k = int(bad[0, 0])
            row = int(torch.searchsorted(indptr, torch.tensor(k), right=True)) - 1
            raise ValueError(f"R(s'={int(indices[k])} | {self._state_action(row)}) is "
                             f"{float(values[k])}: rewards must be finite")

    def _reduce_sparse_reward(self, indptr: Tensor, indices: Tensor, values: Tensor) -> Tensor:
        """sum_s' P(s'|s,a) R(s,a,s') per state-major row, for an R(s, a, s') CSR whose pattern
        differs from P's. An entry stored in one and not the other is a zero there, so R may
        store a subset of P's pattern, or rewards of transitions of probability 0 (they add
        nothing); duplicate entries add, as in scipy. The entries of both, ordered by (row,
        successor), are summed per (row, successor) and multiplied: O(nnz log nnz), no S x S."""
        self._check_finite_per_entry(indptr, indices, values)
        rows = torch.arange(self.num_states * self.num_actions)
        n_p, n_r = self.indices.numel(), indices.numel()
        row = torch.cat([torch.repeat_interleave(rows, self.indptr[1:] - self.indptr[:-1], output_size=n_p),
                         torch.repeat_interleave(rows, indptr[1:] - indptr[:-1], output_size=n_r)])
        col = torch.cat([self.indices.to(torch.int64), indices.to(torch.int64)])
        zeros = torch.zeros(n_p + n_r, dtype=torch.float64)
        p = torch.cat([self.values.to(torch.float64), zeros[:n_r]])
        r = torch.cat([zeros[:n_p], values])
        order = col.sort(stable=True).indices  # then by row, stable: (row, successor) order
        order = order[row[order].sort(stable=True).indices]
        row, col, p, r = row[order], col[order], p[order], r[order]
        first = torch.ones_like(row, dtype=torch.bool)
        first[1:] = (row[1:] != row[:-1]) | (col[1:] != col[:-1])
        group = first.cumsum(0) - 1
        p_sum = torch.zeros(int(first.sum()), dtype=torch.float64).index_add_(0, group, p)
        r_sum = torch.zeros_like(p_sum).index_add_(0, group, r)
        return torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, row[first], p_sum * r_sum)

    def _row_sums(self, per_nonzero: Tensor) -> Tensor:
        if per_nonzero.numel() == 0:
            return torch.zeros(self.num_states * self.num_actions, dtype=per_nonzero.dtype)
        return torch.segment_reduce(per_nonzero, "sum", offsets=self.indptr.to(torch.int64),
                                    unsafe=True)
