"""Value iteration end to end: the random sparse MDP of value_iteration_sparse solved to
epsilon = 1e-6 with the sup-norm rule ||V_k+1 - V_k|| < eps (1 - gamma) / (2 gamma),
gamma = 0.9, float64, from V = 0.

Implementations: ``fastpt``: fastpt.mdp.value_iteration with Gauss-Seidel sweeps (fused
sweeps in 16 phases, the residual computed in the sweep, up to 64 sweeps per kernel call,
plus one sweep for the greedy policy); ``fastpt_jacobi``: the same with Jacobi sweeps, the
textbook iteration that scipy runs; ``eager`` is the vectorised scipy implementation
(scipy.sparse CSR matvec per sweep, then max, argmax and the residual in numpy; scipy's
sparse product runs on one thread whatever the thread count, fastpt on all of them). A
vectorised implementation cannot sweep in Gauss-Seidel order: each phase would be one more
matvec over the rows of that phase.

All three stop on the same rule and return an eps-optimal policy and a V within eps / 2 of
V* (fastpt.mdp.solvers: the rule's proof holds for Gauss-Seidel sweeps), so two answers
may differ by up to eps.

% of copy bandwidth: the bytes of one sweep (see value_iteration_sparse) times the sweeps
fastpt ran.
"""

from __future__ import annotations

import numpy as np
import torch

from fastpt import mdp as M
from fastpt.benchmarks import value_iteration_sparse as sparse
from fastpt.benchmarks.harness import Inputs, OpSpec

EPSILON = 1e-6


def make_inputs(shapes, dtype, requires_grad):
    return Inputs(args=(sparse.make_case(shapes, dtype),))


def fastpt_solve(c: sparse.Case):
    res = M.value_iteration(c.mdp, EPSILON, gauss_seidel=True)
    return res.v, res.policy


def fastpt_jacobi_solve(c: sparse.Case):
    res = M.value_iteration(c.mdp, EPSILON)
    return res.v, res.policy


def scipy_solve(c: sparse.Case):
    if c.scipy_csr is None:
        raise RuntimeError("scipy is not installed (pip install scipy)")
    m = c.mdp
    S, A, g = m.num_states, m.num_actions, m.gamma
    threshold = EPSILON * (1 - g) / (2 * g)
    r = m.reward.numpy()
    v = np.zeros(S)
    while True:
        q = r + g * (c.scipy_csr @ v).reshape(S, A)
        v_new = q.max(1)
        done = np.abs(v_new - v).max() < threshold
        v = v_new
        if done:
            break
    policy = (r + g * (c.scipy_csr @ v).reshape(S, A)).argmax(1)
    return torch.from_numpy(v), torch.from_numpy(policy)


def nbytes(inputs, outputs, mode) -> int:
    c = inputs.args[0]
    sweeps = M.value_iteration(c.mdp, EPSILON, gauss_seidel=True).iterations + 1
    return sweeps * sparse.sweep_bytes(c.mdp)


SPEC = OpSpec(
    name="value_iteration_solve",
    shapes={"full": {"P": (200_000, 4, 16)}, "quick": {"P": (20_000, 4, 16)}},
    make_inputs=make_inputs,
    fastpt=fastpt_solve,
    eager=scipy_solve,
    baselines={"fastpt_jacobi": fastpt_jacobi_solve},
    dtypes=("fp64",),
    modes=("fwd",),
    nbytes=nbytes,
    compile=False,
    agree_tol=EPSILON,  # relative to max |V| (> 1 here): the answers differ by up to eps
)
