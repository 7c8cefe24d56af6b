"""The :class:`MDP`: transitions, expected rewards, discount and terminal states, validated
once in O(nnz) (a sparse MDP is never densified).

Internal form, what the value-iteration kernel reads:

- sparse: one CSR of S*A rows in state-major order (row ``s*A + a`` holds P(.|s,a)), int32
  indices when S fits (12 bytes per nonzero in float64 instead of 16), int32 row pointers
  when the nonzeros fit;
- dense: P as (A, S, S);
- reward: R(s, a) as (S, A). R(s, a, s') is reduced to sum_s' P(s'|s,a) R(s,a,s') in float64.

Terminal states have no outgoing transitions (their rows are emptied): their value is
max_a R(t, a), the terminal reward, and they end an episode.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

from fastpt._checks import check_int
from fastpt.mdp.csr import (_as_tensor, _check_indptr, _check_probability_dtype, _check_real, _gather_rows,
                            _index_array, _sparse_to_state_major)
from fastpt.mdp.rewards import RewardMixin, _PerNonzero

_INT32_MAX = 2**31 - 1


def _row_sum_tol(dtype: torch.dtype, row_len: Tensor) -> Tensor:
    """Allowed |sum - 1| of a row of row_len probabilities stored in dtype: a few roundings
    per term (a float32 row normalised in float32 is off by up to ~n * eps)."""
    return 4 * torch.finfo(dtype).eps * (row_len.to(torch.float64) + 16)


class MDP(RewardMixin):
    """A finite Markov decision process (S states, A actions), validated on construction.

    Args:
        transitions: P(s'|s,a) as one of
            - a dense ``(A, S, S)`` tensor or array, ``P[a, s, s']``;
            - a sequence of A per-action ``(S, S)`` matrices (torch sparse CSR/COO tensors,
              scipy.sparse matrices, or dense);
            - one stacked sparse ``(A*S, S)`` matrix, action-major (row ``a*S + s``).
            For state-major CSR arrays use :meth:`from_csr`.
        reward: R(s) as ``(S,)`` (same for every action), R(s, a) as ``(S, A)``, or R(s, a, s')
            laid out like ``transitions`` (dense ``(A, S, S)``, or, with sparse transitions,
            sparse: an entry not stored is a reward of 0, and one stored where P stores none
            adds nothing, its probability being 0); R(s, a, s') is reduced to R(s, a) =
            sum_s' P R in float64, in O(nnz) for P's own pattern, O(nnz log nnz) for another.
        gamma: discount in (0, 1], a real number (a 0-d tensor is read as float(gamma), to
            its dtype's precision); 1 only with terminal states that every state can reach.
        terminal: indices (or a bool mask) of terminal states: their transitions are dropped
            and their value is max_a R(t, a).
        dtype: torch.float32 or torch.float64 (default: float64).

    Raises:
        ValueError: a shape mismatch, a negative or non-finite probability, a row that does not
            sum to 1 (naming the state and action), a non-finite reward, a successor outside
            [0, S), gamma outside (0, 1], or gamma = 1 without reachable terminal states.
        TypeError: dtype is not float32/float64; complex transitions or rewards (a cast would
            keep only the real part); bool transitions (more likely a mask than
            probabilities); gamma not a real number (a string, a bool).
    """

    def __init__(self, transitions, reward, gamma: float, terminal=None,
                 dtype: torch.dtype = torch.float64):
        sparse = _sparse_to_state_major(transitions)
        if sparse is not None:
            _check_probability_dtype("transitions", sparse[2])
            self._setup(*sparse, None, reward, gamma, terminal, dtype)
            return
        if isinstance(transitions, (list, tuple)):
            mats = [_as_tensor(t) for t in transitions]
            if not mats:
                raise ValueError("transitions is empty: an MDP needs at least one action")
            for a, t in enumerate(mats):
                if t.shape != mats[0].shape:
                    raise ValueError(f"matrix {a} of the sequence has shape {tuple(t.shape)}, matrix 0 "
                                     f"{tuple(mats[0].shape)}: each must be (S, S)")
            p = torch.stack(mats)
        else:
            p = _as_tensor(transitions)
        if p.dim() != 3 or p.shape[1] != p.shape[2]:
            raise ValueError(f"dense transitions must have shape (A, S, S), got {tuple(p.shape)}")
        for n, what, letter in ((p.shape[1], "states", "S"), (p.shape[0], "actions", "A")):
            if n == 0:
                raise ValueError(f"the number of {what} is 0 (transitions of shape {tuple(p.shape)}): "
                                 f"{letter} must be >= 1")
        _check_probability_dtype("transitions", p)
        self._setup(None, None, None, p.shape[1], p.shape[0], p, reward, gamma, terminal, dtype)

    @classmethod
    def from_csr(cls, indptr, indices, values, num_states: int, num_actions: int, reward,
                 gamma: float, terminal=None, dtype: torch.dtype = torch.float64,
                 order: str = "state", reward_per_nonzero: bool | None = None) -> "MDP":
        """An MDP from the arrays of one CSR of S*A rows: ``order="state"`` (row ``s*A + a``,
        the kernel's layout, taken without reordering) or ``"action"`` (row ``a*S + s``).
        ``reward`` may also be a 1-D tensor with one R(s, a, s') per nonzero: inferred from its
        length (``reward_per_nonzero=None``), or said explicitly, which a CSR with exactly S
        nonzeros needs (a length-S reward would also be R(s))."""
        if order not in ("state", "action"):
            raise ValueError(f"order must be 'state' or 'action', got {order!r}")
        S, A = check_int("num_states", num_states), check_int("num_actions", num_actions)
        if S < 1 or A < 1:
            raise ValueError(f"an MDP needs at least one state and one action, got S={S}, A={A}")
        indptr, indices = _index_array("indptr", indptr), _index_array("indices", indices)
        values = _as_tensor(values)
        _check_probability_dtype("values", values)
        if indptr.dim() != 1 or indptr.numel() != S * A + 1:
            raise ValueError(f"indptr must have S*A + 1 = {S * A + 1} entries, got {indptr.numel()}")
        if indices.shape != values.shape or indices.dim() != 1:
            raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must "
                             "be 1-D of the same length")
        _check_indptr(indptr, indices.numel())
        lo, hi = int(indptr[0]), int(indptr[-1])
        if reward_per_nonzero and isinstance(reward, (list, tuple)):
            reward = _as_tensor(reward)
        one_per_nonzero = isinstance(reward, (Tensor, np.ndarray)) and np.ndim(reward) == 1 and \
            len(reward) == indices.numel()
        if reward_per_nonzero is None:
            if one_per_nonzero and len(reward) == S:
                raise ValueError(f"a reward of {S} entries is ambiguous here: the CSR also holds {S} "
                                 "nonzeros; pass reward_per_nonzero=True (one R(s, a, s') per "
                                 "nonzero) or False (R(s) per state)")
            reward_per_nonzero = one_per_nonzero
        elif reward_per_nonzero and not one_per_nonzero:
            raise ValueError(f"reward_per_nonzero=True needs a 1-D reward with one entry per nonzero "
                             f"({indices.numel()}), got shape {tuple(np.shape(reward))}")
        per_nonzero = _check_real("reward", _as_tensor(reward)).to(torch.float64)[lo:hi] \
            if reward_per_nonzero else None
        indptr, indices, values = indptr - lo, indices[lo:hi], values[lo:hi]
        if order == "action":
            indptr, take = _gather_rows(indptr, torch.arange(S * A).view(A, S).t().reshape(-1))
            indices, values = indices[take], values[take]
            per_nonzero = None if per_nonzero is None else per_nonzero[take]
        self = cls.__new__(cls)
        self._setup(indptr, indices, values, S, A, None,
                    reward if per_nonzero is None else _PerNonzero(per_nonzero),
                    gamma, terminal, dtype)
        return self

    def _setup(self, indptr, indices, values, S, A, p, reward, gamma, terminal, dtype) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype, self.num_states, self.num_actions = dtype, int(S), int(A)
        # Rows are checked to the rounding of the probabilities as given (float32 P in a
        # float64 MDP sums to 1 within float32's eps, not float64's).
        given = (p if p is not None else values).dtype
        self._rounding_dtype = given if given.is_floating_point and \
            torch.finfo(given).eps > torch.finfo(dtype).eps else dtype
        self.p = None if p is None else p.to(dtype).contiguous()
        self.indptr, self.indices = indptr, indices
        self.values = None if values is None else values.to(dtype)
        self.terminal = self._terminal_mask(terminal)
        self.gamma = self._check_gamma(gamma)
        self._check_probabilities()
        self.reward = self._reduce_reward(reward)
        self._drop_terminal_rows()
        if self.gamma == 1.0:
            self._check_terminals_reachable()

    # ------------------------------------------------------------------ validation
    def _terminal_mask(self, terminal) -> Tensor:
        S = self.num_states
        mask = torch.zeros(S, dtype=torch.bool)
        if terminal is None:
            return mask
        t = _as_tensor(terminal)
        if t.numel() == 0:  # [] (numpy makes it float64): no terminal state
            return mask
        if t.dtype == torch.bool:
            if t.shape != (S,):
                raise ValueError(f"a terminal mask must have shape ({S},), got {tuple(t.shape)}")
            return t.clone()
        if t.is_floating_point() or t.is_complex():  # 2.9 would silently become state 2
            raise TypeError(f"terminal must be state indices (integers) or a bool mask, got {t.dtype}")
        t = t.reshape(-1).to(torch.int64)
        if t.numel() == S and S > 1 and bool(((t == 0) | (t == 1)).all()) and t.unique().numel() < S:
            # [0, 0, 0, 1] read as indices makes states 0 and 1 terminal, not state 3.
            raise ValueError(f"terminal looks like a 0/1 mask over the {S} states ({t.tolist()[:10]}), but "
                             f"integers are read as state indices: pass a bool mask or the indices")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= S):
            raise ValueError(f"terminal states must be in [0, {S}), got {t.tolist()[:10]}")
        mask[t] = True
        return mask

    @staticmethod
    def _check_gamma(gamma) -> float:
        if isinstance(gamma, (Tensor, np.ndarray)) and gamma.ndim == 0:
            gamma = gamma.item()  # as float(gamma): what its dtype holds
        # bool is an int to Python: True would read as 1.0; "0.9" would parse
        if isinstance(gamma, (bool, np.bool_)) or not isinstance(gamma, numbers.Real):
            raise TypeError(f"gamma must be a real number, got {type(gamma).__name__} {gamma!r}")
        gamma = float(gamma)
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        return gamma

    def _state_action(self, row: int) -> str:
        return f"state {row // self.num_actions}, action {row % self.num_actions}"

    def _check_probabilities(self) -> None:
        S, A = self.num_states, self.num_actions
        if self.p is not None:
            p = self.p
            bad = ~torch.isfinite(p) | (p < 0)
            if bool(bad.any()):
                a, s, s2 = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"P(s'={s2} | state {s}, action {a}) = {float(p[a, s, s2])}: "
                                 "probabilities must be finite and >= 0")
            sums = p.sum(-1, dtype=torch.float64).t().reshape(-1)  # state-major rows
            lens = torch.full_like(sums, S)
        else:
            v, ix = self.values, self.indices
            bad = ~torch.isfinite(v) | (v < 0)
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                row = int(torch.searchsorted(self.indptr, torch.tensor(k), right=True)) - 1
                raise ValueError(f"P(s'={int(ix[k])} | {self._state_action(row)}) = {float(v[k])}: "
                                 "probabilities must be finite and >= 0")
            if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= S):
                k = int(((ix < 0) | (ix >= S)).nonzero()[0, 0])
                row = int(torch.searchsorted(self.indptr, torch.tensor(k), right=True)) - 1
                raise ValueError(f"successor {int(ix[k])} of {self._state_action(row)} is outside "
                                 f"[0, {S})")
            lens = (self.indptr[1:] - self.indptr[:-1]).to(torch.float64)
            sums = torch.segment_reduce(v.to(torch.float64), "sum", offsets=self.indptr,
                                        unsafe=True) if v.numel() else torch.zeros(S * A, dtype=torch.float64)
        live = ~self.terminal.repeat_interleave(A)
        off = live & ~((sums - 1).abs() <= _row_sum_tol(self._rounding_dtype, lens))
        if bool(off.any()):
            row = int(off.nonzero()[0, 0])
            raise ValueError(f"the transition probabilities of {self._state_action(row)} sum to "
                             f"{float(sums[row])!r}, not 1 (each non-terminal (state, action) row must "
                             "be a probability distribution)")

    def _drop_terminal_rows(self) -> None:
        if not bool(self.terminal.any()):
            self._finish_sparse()
            return
        if self.p is not None:  # a new tensor: the caller's P stays as it was
            self.p = self.p.masked_fill(self.terminal.view(1, -1, 1), 0)
            return
        keep_rows = ~self.terminal.repeat_interleave(self.num_actions)
        counts = (self.indptr[1:] - self.indptr[:-1]) * keep_rows
        keep = torch.repeat_interleave(keep_rows, self.indptr[1:] - self.indptr[:-1],
                                       output_size=self.indices.numel())
        self.indices, self.values = self.indices[keep], self.values[keep]
        self.indptr = torch.zeros_like(self.indptr)
        torch.cumsum(counts, 0, out=self.indptr[1:])
        self._finish_sparse()

    def _finish_sparse(self) -> None:
        """Narrow index types where they fit (fewer bytes per sweep)."""
        if self.p is not None:
            return
        if self.num_states <= _INT32_MAX:
            self.indices = self.indices.to(torch.int32)
        if int(self.indptr[-1]) <= _INT32_MAX:
            self.indptr = self.indptr.to(torch.int32)
        self.indices, self.values = self.indices.contiguous(), self.values.contiguous()

    def _check_terminals_reachable(self) -> None:
        """gamma = 1: values are finite only if every state can reach a terminal state (then a
        proper policy exists). Necessary, not sufficient: a cycle of positive rewards that a
        policy can stay in forever still has infinite value (value iteration then reports
        ``converged=False``)."""
        if not bool(self.terminal.any()):
            raise ValueError("gamma = 1 needs terminal (absorbing) states: pass terminal=... or "
                             "use gamma < 1")
        self.proper_policy()

    def proper_policy(self) -> Tensor:
        """A deterministic policy that reaches a terminal state from every state with
        probability 1: each state takes an action with a positive probability of moving one
        step closer (in transitions) to a terminal state. (S,) int64, 0 at terminal states.
        Reverse breadth-first search from the terminal states, O(nnz); a ValueError names a
        state that cannot reach any terminal state."""
        S, A = self.num_states, self.num_actions
        if self.p is not None:
            a, s, s2 = self.p.nonzero(as_tuple=True)  # stored probabilities are >= 0
            rows, dst = (s * A + a).numpy(), s2.numpy()
        else:
            rows = torch.repeat_interleave(torch.arange(S * A), (self.indptr[1:] - self.indptr[:-1]).to(torch.int64),
                                           output_size=self.indices.numel())
            positive = self.values > 0  # a stored zero is no way out
            rows, dst = rows[positive].numpy(), self.indices[positive].to(torch.int64).numpy()
        order = np.argsort(dst, kind="stable")
        pred = rows[order]  # (state, action) rows, grouped by the successor they lead to
        start = np.searchsorted(dst[order], np.arange(S + 1))
        reached = self.terminal.numpy().copy()
        policy = np.zeros(S, dtype=np.int64)
        frontier = np.flatnonzero(reached)
        while frontier.size:
            lens = start[frontier + 1] - start[frontier]
            idx = np.repeat(start[frontier] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
            states, first = np.unique(pred[idx] // A, return_index=True)
            new = ~reached[states]
            policy[states[new]] = pred[idx][first[new]] % A
            reached[states[new]] = True
            frontier = states[new]
        if not reached.all():
            s = int(np.flatnonzero(~reached)[0])
            raise ValueError(f"state {s} cannot reach a terminal state (with gamma = 1 its values "
                             "would diverge); use gamma < 1 or make a terminal state reachable")
        return torch.from_numpy(policy)

    # ------------------------------------------------------------------ views
    @property
    def is_sparse(self) -> bool:
        return self.p is None

    @property
    def nnz(self) -> int:
        return int(self.indices.numel()) if self.is_sparse else int(self.p.numel())

    def transitions(self):
        """What the kernel reads: the dense (A, S, S) tensor or (indptr, indices, values)."""
        return self.p if self.p is not None else (self.indptr, self.indices, self.values)

    def restricted(self, policy: Tensor) -> "MDP":
        """The Markov chain of a deterministic policy as a one-action MDP (same terminals)."""
        S, A = self.num_states, self.num_actions
        policy = self.check_policy(policy)
        m = MDP.__new__(MDP)
        m.dtype, m.gamma, m.terminal = self.dtype, self.gamma, self.terminal
        m.num_states, m.num_actions = S, 1
        m.reward = self.reward.gather(1, policy.view(S, 1)).contiguous()
        if self.p is not None:
            m.p = self.p[policy, torch.arange(S)].unsqueeze(0).contiguous()
            m.indptr = m.indices = m.values = None
        else:
            m.p = None
            rows = torch.arange(S) * A + policy
            k = self._row_length()
            if k is not None:  # every row has k nonzeros (k = 0: all terminal): rows of an (S*A, k) view
                m.indptr = torch.arange(S + 1, dtype=self.indptr.dtype) * k
                m.indices = self.indices.view(S * A, k).index_select(0, rows).view(-1)
                m.values = self.values.view(S * A, k).index_select(0, rows).view(-1)
            else:
                indptr, take = _gather_rows(self.indptr.to(torch.int64), rows)
                m.indptr = indptr.to(self.indptr.dtype)
                m.indices, m.values = self.indices[take], self.values[take]
        return m

    def check_policy(self, policy) -> Tensor:
        """policy as a contiguous (S,) int64 tensor of actions in [0, A), or a clear error."""
        policy = torch.as_tensor(policy)
        if policy.is_floating_point() or policy.is_complex() or policy.dtype == torch.bool:
            raise TypeError(f"policy must hold integer action indices, got {policy.dtype}")
        policy = policy.to(torch.int64).contiguous()
        if policy.shape != (self.num_states,):
            raise ValueError(f"policy must have shape ({self.num_states},), got {tuple(policy.shape)}")
        if policy.numel() and (int(policy.min()) < 0 or int(policy.max()) >= self.num_actions):
            raise ValueError(f"policy actions must be in [0, {self.num_actions})")
        return policy

    def _row_length(self) -> int | None:
        """k when every (state, action) row of the sparse transitions has k nonzeros (as
        random_sparse_mdp makes them), else None."""
        lengths = self.indptr[1:] - self.indptr[:-1]
        k = int(lengths[0]) if lengths.numel() else 0
        return k if bool((lengths == k).all()) else None

    def __repr__(self) -> str:
        kind = f"sparse, nnz={self.nnz}" if self.is_sparse else "dense"
        return (f"MDP(states={self.num_states}, actions={self.num_actions}, gamma={self.gamma}, "
                f"{kind}, terminal={int(self.terminal.sum())}, dtype={self.dtype})")
