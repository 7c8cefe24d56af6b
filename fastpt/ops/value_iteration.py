"""Bellman sweeps with the max over actions fused: ``fastpt::value_iteration_sparse`` and
``fastpt::value_iteration_dense``. The solvers around them live in :mod:`fastpt.mdp`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastpt.ops._checks import check_same_device, check_same_dtype, check_type, check_value, dtype_name, num, sizes


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
    the kernel's max skips NaN: a sweep would return -inf values and report convergence.)
    A meta tensor has no values to check."""
    if t.device.type == "meta":
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}{list(at)} is {float(t[at])}: values must be finite")


# The checks of csrc/ops/value_iteration/value_iteration_checks.h, for the fake kernels (the
# CSR arrays' values, indptr monotone and successors in range, need the data: real op only).

def _check_common(reward, v, gamma, sweeps, gauss_seidel, tol, first_state):
    # value_iteration_common (and the CUDA glue's Jacobi-only rule)
    check_type(reward.dtype in (torch.float32, torch.float64),
               lambda: f"reward must be float32 or float64, got {dtype_name(reward.dtype)}")
    check_same_dtype(v, reward, "v", "reward")
    check_same_device("reward", reward, v=v)
    check_value(reward.dim() == 2 and reward.shape[1] >= 1,
                lambda: f"reward must have shape (states, actions) with actions >= 1, got {sizes(reward)}")
    check_value(v.dim() == 1, lambda: f"v must be 1-D (one value per state), got shape {sizes(v)}")
    check_value(math.isfinite(gamma) and 0 < gamma <= 1, lambda: f"gamma must be in (0, 1], got {num(gamma)}")
    check_value(sweeps >= 1, lambda: f"sweeps must be >= 1, got {sweeps}")
    check_value(not math.isnan(tol), lambda: "tol must not be NaN")
    states, num_states = reward.shape[0], v.shape[0]
    check_value(first_state >= 0 and first_state <= num_states - states,
                lambda: f"states [first_state, first_state + reward.shape[0]) with first_state = {first_state} and "
                f"{states} states must lie within the {num_states} states of v")
    check_value(sweeps == 1 or (first_state == 0 and states == num_states),
                lambda: "sweeps > 1 needs the whole MDP (first_state 0 and reward.shape[0] == v.shape[0]); "
                "a partition of the states runs one sweep per call")
    if reward.device.type == "cuda":
        check_value(not gauss_seidel, lambda: "gauss_seidel=True is CPU only; CUDA runs Jacobi sweeps")


def _check_index(t, name):
    check_type(t.dtype in (torch.int32, torch.int64),
               lambda: f"{name} must be int32 or int64, got {dtype_name(t.dtype)}")
    check_value(t.dim() == 1, lambda: f"{name} must be 1-D, got shape {sizes(t)}")


def _fake_outputs(reward, v, sweeps, return_q):
    states, actions = reward.shape
    q = reward.new_empty((states, actions) if return_q else (0,))
    return (v.new_empty((states,)), v.new_empty((states,), dtype=torch.int64),
            v.new_empty((sweeps, 2), dtype=torch.float64), q)


@torch.library.register_fake("fastpt::value_iteration_sparse")
def _sparse_fake(indptr, indices, values, reward, v, gamma, sweeps=1, gauss_seidel=False,
                 return_q=False, tol=0.0, span=False, first_state=0):
    _check_common(reward, v, gamma, sweeps, gauss_seidel, tol, first_state)
    # value_iteration_check_sparse
    _check_index(indptr, "indptr")
    _check_index(indices, "indices")
    check_same_dtype(values, reward, "values", "reward")
    check_same_device("reward", reward, values=values, indptr=indptr, indices=indices)
    check_value(values.dim() == 1 and values.shape[0] == indices.shape[0], lambda: "values must be 1-D with one "
                f"probability per index ({indices.shape[0]}), got shape {sizes(values)}")
    rows = reward.shape[0] * reward.shape[1]
    check_value(indptr.shape[0] == rows + 1, lambda: f"indptr must have states * actions + 1 = {rows + 1} entries "
                f"(rows in state-major order s * actions + a), got {indptr.shape[0]}")
    return _fake_outputs(reward, v, sweeps, return_q)


@torch.library.register_fake("fastpt::value_iteration_dense")
def _dense_fake(p, reward, v, gamma, sweeps=1, gauss_seidel=False, return_q=False, tol=0.0,
                span=False, first_state=0):
    _check_common(reward, v, gamma, sweeps, gauss_seidel, tol, first_state)
    # value_iteration_check_dense
    check_same_dtype(p, reward, "p", "reward")
    check_same_device("reward", reward, p=p)
    (states, actions), num_states = reward.shape, v.shape[0]
    check_value(p.dim() == 3 and tuple(p.shape) == (actions, states, num_states), lambda: "p must have shape "
                f"(actions, states, num_states) = ({actions}, {states}, {num_states}), got {sizes(p)}")
    return _fake_outputs(reward, v, sweeps, return_q)
