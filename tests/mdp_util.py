"""The independent plain-numpy MDP reference the fastpt.mdp tests compare against, and the small
MDPs they build."""

from __future__ import annotations

import numpy as np
import torch

from fastpt import mdp as M


GS_PHASES = 16  # kGaussSeidelPhases in csrc/ops/value_iteration/value_iteration.h


# ---------------------------------------------------------------- the numpy reference

def np_dense(m: M.MDP) -> np.ndarray:
    """P as a dense (A, S, S) float64 array (small MDPs only), from either storage."""
    if not m.is_sparse:
        return m.p.double().numpy()
    S, A = m.num_states, m.num_actions
    p = np.zeros((A, S, S))
    indptr, idx, val = (m.indptr.long().numpy(), m.indices.long().numpy(), m.values.double().numpy())
    for r in range(S * A):
        for k in range(indptr[r], indptr[r + 1]):
            p[r % A, r // A, idx[k]] += val[k]
    return p


def np_bellman(p: np.ndarray, r: np.ndarray, gamma: float, v: np.ndarray):
    """One Jacobi sweep: (V', policy, Q), Q[s, a] = R[s, a] + gamma sum_s' P[a, s, s'] V[s']."""
    q = r + gamma * np.einsum("ast,t->sa", p, v)
    return q.max(1), q.argmax(1), q


def gs_phases(S, phases):
    """The kernel's Gauss-Seidel phases: min(S, phases) runs [lo, hi) of consecutive states,
    swept in order; a state reads the new values of the states of earlier phases and the
    previous values of all others (its own phase's included). phases=1: Jacobi."""
    n = min(S, phases)
    return [(j * S // n, (j + 1) * S // n) for j in range(n)]


def np_bellman_gs(p, r, gamma, v, phases=GS_PHASES):
    """One Gauss-Seidel sweep by phases (gs_phases) of a dense MDP."""
    S = len(v)
    cur, new, pol = v.copy(), np.empty(S), np.empty(S, dtype=np.int64)
    for lo, hi in gs_phases(S, phases):
        q = r[lo:hi] + gamma * np.einsum("ast,t->sa", p[:, lo:hi, :], cur)
        new[lo:hi], pol[lo:hi] = q.max(1), q.argmax(1)
        cur[lo:hi] = new[lo:hi]
    return new, pol


def np_sweep_csr(indptr, idx, val, r, gamma, v, first=0, phases=1):
    """One sweep of the local states [first, first + S) of a CSR MDP (row s * A + a of local
    state s; indptr may start past 0), in gs_phases(S, phases)."""
    S, A = r.shape
    used = slice(int(indptr[0]), int(indptr[-1]))
    rows = np.repeat(np.arange(S * A), np.diff(indptr))
    cur, new, pol = v.copy(), np.empty(S), np.empty(S, dtype=np.int64)
    for lo, hi in gs_phases(S, phases):
        sums = np.bincount(rows, weights=val[used] * cur[idx[used]], minlength=S * A)
        q = r[lo:hi] + gamma * sums.reshape(S, A)[lo:hi]
        new[lo:hi], pol[lo:hi] = q.max(1), q.argmax(1)
        cur[first + lo:first + hi] = new[lo:hi]
    return new, pol


def np_value_iteration(p, r, gamma, eps=1e-12, max_iter=100000):
    v = np.zeros(p.shape[1])
    for _ in range(max_iter):
        v2, pol, _ = np_bellman(p, r, gamma, v)
        if np.abs(v2 - v).max() < eps:
            return v2, pol
        v = v2
    raise AssertionError("numpy value iteration did not converge")


def np_policy_value(p, r, gamma, policy):
    S = p.shape[1]
    pp = p[policy, np.arange(S)]
    return np.linalg.solve(np.eye(S) - gamma * pp, r[np.arange(S), policy])


def np_optimal_values(p, r, gamma):
    """V* by Howard's policy iteration (a linear solve per policy): exact to rounding, in a
    few solves where value iteration at gamma 0.999 takes ~30,000 sweeps."""
    policy = r.argmax(1)
    while True:
        v = np_policy_value(p, r, gamma, policy)
        q = r + gamma * np.einsum("ast,t->sa", p, v)
        better = q.max(1) > q[np.arange(len(v)), policy] + 1e-12 * (1 + np.abs(v))
        if not better.any():
            return v
        policy = np.where(better, q.argmax(1), policy)


def small_random_mdp(S=37, A=3, K=5, seed=0, dtype=torch.float64, gamma=0.9):
    return M.random_sparse_mdp(S, A, K, seed, gamma=gamma, dtype=dtype)


def as_dense_mdp(m: M.MDP) -> M.MDP:
    return M.MDP(torch.from_numpy(np_dense(m)), m.reward.double(), m.gamma, dtype=m.dtype)


def _p_ok():
    p = torch.zeros(2, 3, 3, dtype=torch.float64)
    p[:, :, 0] = 0.5
    p[:, :, 1] = 0.5
    return p
