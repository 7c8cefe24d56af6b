"""Bellman sweeps with the max over actions fused: ``fastpt::value_iteration_sparse`` and
``fastpt::value_iteration_dense``. The solvers around them live in :mod:`fastpt.mdp`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device


class Sweep(NamedTuple):
    """Result of :func:`value_iteration`.

    v: (S,) values after the last sweep run. policy: (S,) int64 greedy action of that sweep
    (the first maximising action on ties). dv: (sweeps, 2) float64, min and max over states
    of V_new - V_old for each sweep (NaN rows: sweeps not run because ``tol`` was reached).
    q: (S, A) Q-values of the last sweep, or an empty tensor unless ``return_q``.
    """

    v: Tensor
    policy: Tensor
    dv: Tensor
    q: Tensor


def value_iteration(transitions, reward: Tensor, v: Tensor, gamma: float, *, sweeps: int = 1,
                    gauss_seidel: bool = False, return_q: bool = False, tol: float = 0.0,
                    span: bool = False, first_state: int = 0, check: bool = True) -> Sweep:
    """Runs ``sweeps`` Bellman sweeps V(s) <- max_a [R(s,a) + gamma * sum_s' P(s'|s,a) V(s')].

    Args:
        transitions: dense ``(A, S, S)`` tensor P[a, s, s'], or sparse as a tuple
            ``(indptr, indices, values)``: a CSR of S*A rows in state-major order (row
            ``s*A + a`` holds P(.|s,a); int32 or int64 indices). An empty row (or an all-zero
            dense row) is an exit: Q(s,a) = R(s,a), as for a terminal state.
        reward: (S, A) expected reward R(s,a), float32 or float64; sets the dtype.
        v: (S_total,) current values, reward's dtype. S_total > S when this call updates the
            block of states [first_state, first_state + S) of a partitioned MDP.
        gamma: discount in (0, 1].
        sweeps: sweeps in this call (> 1 only for the whole MDP).
        gauss_seidel: sweep the S states in min(S, 16) phases of consecutive states, one
            after the other; a state reads this sweep's values of the states of earlier
            phases (CPU only; the same bits whatever the thread count).
        return_q: also return Q of the last sweep.
        tol: stop after a sweep whose residual (max |dV|, or its span with ``span``) is < tol.
        check: verify that v, reward and the transition probabilities are finite (O(S*A) +
            O(nnz), or O(A*S*S) dense: about one sweep); the solvers of :mod:`fastpt.mdp`
            validate once and call the op directly. The CSR's structure (indptr monotone and
            within the indices, successors in [0, S_total)) is checked by the op itself, once
            per set of arrays, whatever ``check`` says.

    Returns:
        :class:`Sweep` (v, policy, dv, q).
    """
    dense = isinstance(transitions, Tensor) and transitions.layout == torch.strided
    if not dense and not (isinstance(transitions, (tuple, list)) and len(transitions) == 3 and
                          all(isinstance(t, Tensor) for t in transitions)):
        raise TypeError("transitions must be a dense (A, S, S) tensor or an (indptr, indices, values) "
                        "tuple of tensors in state-major row order, got "
                        f"{_describe(transitions)}")
    for name, t in (("reward", reward), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if check:
        check_finite("v", v)
        check_finite("reward", reward)
        check_finite("transitions" if dense else "values", transitions if dense else transitions[2])
    if dense:
        out = torch.ops.fastpt.value_iteration_dense(transitions, reward, v, gamma, sweeps,
                                                     gauss_seidel, return_q, tol, span, first_state)
    else:
        indptr, indices, values = transitions
        out = torch.ops.fastpt.value_iteration_sparse(indptr, indices, values, reward, v, gamma,
                                                      sweeps, gauss_seidel, return_q, tol, span,
                                                      first_state)
    return Sweep(*out)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a {x.layout} tensor"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} ({', '.join(type(t).__name__ for t in x)})"
    return type(x).__name__


def check_finite(name: str, t: Tensor) -> None:
    """ValueError naming the first NaN or infinite entry of t. (A NaN value makes its Q NaN,
    the kernel's max skips NaN: a sweep would return -inf values and report convergence.)"""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}{list(at)} is {float(t[at])}: values must be finite")


def _fake_outputs(reward, v, sweeps, return_q):
    states, actions = reward.shape
    q = reward.new_empty((states, actions) if return_q else (0,))
    return (v.new_empty((states,)), v.new_empty((states,), dtype=torch.int64),
            v.new_empty((sweeps, 2), dtype=torch.float64), q)


@torch.library.register_fake("fastpt::value_iteration_sparse")
def _sparse_fake(indptr, indices, values, reward, v, gamma, sweeps=1, gauss_seidel=False,
                 return_q=False, tol=0.0, span=False, first_state=0):
    check_same_device("reward", reward, v=v, values=values, indptr=indptr, indices=indices)
    torch._check(indptr.shape[0] == reward.shape[0] * reward.shape[1] + 1,
                 lambda: "indptr must have states * actions + 1 entries")
    return _fake_outputs(reward, v, sweeps, return_q)


@torch.library.register_fake("fastpt::value_iteration_dense")
def _dense_fake(p, reward, v, gamma, sweeps=1, gauss_seidel=False, return_q=False, tol=0.0,
                span=False, first_state=0):
    check_same_device("reward", reward, v=v, p=p)
    torch._check(p.dim() == 3 and p.shape[0] == reward.shape[1] and p.shape[1] == reward.shape[0],
                 lambda: "p must have shape (actions, states, num_states)")
    return _fake_outputs(reward, v, sweeps, return_q)
