"""fastpt.mdp's solvers against the plain-numpy reference and the known utilities of Russell &
Norvig's 4x3 gridworld, MDP.restricted's one-action chain, and game-tree search."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fastpt import mdp as M
from mdp_util import as_dense_mdp, np_bellman, np_dense, np_policy_value, np_value_iteration, small_random_mdp


# ---------------------------------------------------------------- gridworld (known values)

# AIMA (3rd ed.) figure 17.3: utilities of the 4x3 world, gamma = 1, living reward -0.04.
GRID_UTILITIES = {(1, 1): 0.705, (2, 1): 0.655, (3, 1): 0.611, (4, 1): 0.388,
                  (1, 2): 0.762, (3, 2): 0.660, (1, 3): 0.812, (2, 3): 0.868, (3, 3): 0.918,
                  (4, 3): 1.0, (4, 2): -1.0}
# Figure 17.2 (a): the optimal policy (up, down, left, right = 0, 1, 2, 3).
GRID_POLICY = {(1, 1): 0, (1, 2): 0, (1, 3): 3, (2, 3): 3, (3, 3): 3, (2, 1): 2, (3, 1): 2,
               (3, 2): 0, (4, 1): 2}


@pytest.mark.parametrize("solver", ["vi", "vi_span", "vi_gs", "pi", "mpi"])
def test_gridworld_known_utilities(solver):
    g = M.gridworld_4x3()
    m = g.mdp
    res = {"vi": lambda: M.value_iteration(m, 1e-8),
           "vi_span": lambda: M.value_iteration(m, 1e-8, stop="span"),
           "vi_gs": lambda: M.value_iteration(m, 1e-8, gauss_seidel=True),
           "pi": lambda: M.policy_iteration(m),
           "mpi": lambda: M.modified_policy_iteration(m, 1e-8, m=5)}[solver]()
    assert res.converged and res.iterations >= 1 and len(res.history) == res.iterations
    for cell, u in GRID_UTILITIES.items():
        assert abs(float(res.v[g.state(*cell)]) - u) < 1e-3, (cell, float(res.v[g.state(*cell)]))
    for cell, a in GRID_POLICY.items():
        assert int(res.policy[g.state(*cell)]) == a, cell
    text = g.render(res.v, res.policy)
    assert "+0.705" in text
    assert all(line == line.rstrip() for line in text.splitlines())  # no trailing blanks


def test_gridworld_matches_numpy_and_discounted():
    g = M.gridworld_4x3(living_reward=-0.1, gamma=0.9, dtype=torch.float32)
    p, r = np_dense(g.mdp), g.mdp.reward.double().numpy()
    want_v, want_pol = np_value_iteration(p, r, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1e-5 would ask for changes within float32's rounding
        res = M.value_iteration(g.mdp, 1e-4)
    np.testing.assert_allclose(res.v.numpy(), want_v, atol=5e-5)  # eps / 2
    assert np.array_equal(res.policy.numpy(), want_pol)


# ---------------------------------------------------------------- solvers vs numpy

@pytest.mark.parametrize("sparse", [True, False])
def test_solvers_match_numpy(sparse):
    m = small_random_mdp(120, 4, 6, seed=7, gamma=0.95)
    if not sparse:
        m = as_dense_mdp(m)
    p, r, g = np_dense(m), m.reward.numpy(), m.gamma
    v_star, pol_star = np_value_iteration(p, r, g)
    eps = 1e-6
    sup = M.value_iteration(m, eps)
    assert sup.converged and np.abs(sup.v.numpy() - v_star).max() < eps / 2
    assert np.array_equal(sup.policy.numpy(), pol_star)
    # the stopping rule met at the last sweep only
    thr = eps * (1 - g) / (2 * g)
    assert sup.history[-1] < thr and all(h >= thr for h in sup.history[:-1])
    span = M.value_iteration(m, eps, stop="span")
    # MacQueen's bounds put V* within gamma / (1 - gamma) * span / 2 of the extrapolated V:
    # eps / 2 too (v_star is within ~2e-11, float64 rounding far below)
    assert span.iterations < sup.iterations and np.abs(span.v.numpy() - v_star).max() < eps / 2
    assert np.array_equal(span.policy.numpy(), pol_star)
    pi = M.policy_iteration(m)
    np.testing.assert_allclose(pi.v.numpy(), v_star, atol=1e-8)
    assert np.array_equal(pi.policy.numpy(), pol_star) and pi.history[-1] == 0
    mpi = M.modified_policy_iteration(m, eps, m=8)
    assert mpi.converged and np.abs(mpi.v.numpy() - v_star).max() < eps
    assert mpi.iterations < sup.iterations
    pol = torch.randint(0, m.num_actions, (m.num_states,))
    want = np_policy_value(p, r, g, pol.numpy())
    for method in ("auto", "iterative") + (() if sparse else ("direct",)):
        ev = M.policy_evaluation(m, pol, method=method, epsilon=1e-10)
        np.testing.assert_allclose(ev.v.numpy(), want, atol=1e-9)
    if sparse:
        with pytest.raises(ValueError, match="dense"):
            M.policy_evaluation(m, pol, method="direct")
    fh = M.backward_induction(m, 5, gamma=1.0)
    v = np.zeros(m.num_states)
    for t in range(4, -1, -1):
        v, pol_t, _ = np_bellman(p, r, 1.0, v)
        np.testing.assert_allclose(fh.v[t].numpy(), v, rtol=1e-12)
        assert np.array_equal(fh.policy[t].numpy(), pol_t)
    vq = M.value_iteration(m, eps, return_q=True)
    np.testing.assert_allclose(vq.q.numpy(), np_bellman(p, r, g, vq.v.numpy())[2], rtol=1e-12)


def test_value_iteration_max_iter_and_args():
    m = small_random_mdp(30, 2, 3, gamma=0.99)
    res = M.value_iteration(m, 1e-9, max_iter=7, sweeps_per_call=3)
    assert not res.converged and res.iterations == 7 and len(res.history) == 7
    with pytest.raises(ValueError, match="stop"):
        M.value_iteration(m, stop="max")
    with pytest.raises(ValueError, match="Jacobi"):
        M.value_iteration(m, stop="span", gauss_seidel=True)
    with pytest.raises(ValueError, match="epsilon"):
        M.value_iteration(m, 0.0)
    with pytest.raises(ValueError, match="v0"):
        M.value_iteration(m, v0=torch.zeros(3))
    with pytest.raises(ValueError, match="policy"):
        M.policy_evaluation(m, torch.full((30,), 2))
    with pytest.raises(TypeError, match="integer action indices"):  # 0.5 would truncate to 0
        M.policy_evaluation(m, torch.full((30,), 0.5))


@pytest.mark.parametrize("uniform", [True, False])
def test_restricted_chain_is_the_policy_rows(uniform):
    """MDP.restricted(policy): row s of the one-action chain is row (s, policy[s]) of P, for
    equal row lengths (whole rows of a (S*A, k) view) and unequal ones (the general gather)."""
    m = M.random_sparse_mdp(50, 3, 4, seed=3, gamma=0.9)
    if not uniform:  # every other state moves to one certain successor: rows of 1 and of up to 4 nonzeros
        p = np_dense(m)
        p[:, ::2, :] = 0
        for a in range(3):
            for s in range(0, 50, 2):
                p[a, s, (s + a) % 50] = 1.0
        m = M.MDP([torch.from_numpy(p[a]).to_sparse_csr() for a in range(3)], m.reward, 0.9)
        lengths = m.indptr[1:] - m.indptr[:-1]
        assert lengths.unique().numel() > 1
    policy = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(4))
    chain = m.restricted(policy)
    assert chain.num_actions == 1 and chain.indptr.dtype == m.indptr.dtype
    expected = np_dense(m)[policy.numpy(), np.arange(50)]
    np.testing.assert_array_equal(np_dense(chain)[0], expected)
    np.testing.assert_array_equal(chain.reward.view(-1).numpy(), m.reward.gather(1, policy.view(-1, 1)).view(-1).numpy())


def test_restricted_chain_of_an_all_terminal_mdp():
    """Terminal states lose their transitions: every row has 0 nonzeros, the chain too."""
    m = M.random_sparse_mdp(6, 2, 3, seed=0, gamma=0.9)
    t = M.MDP.from_csr(m.indptr, m.indices, m.values, 6, 2, m.reward, 0.9, terminal=torch.ones(6, dtype=torch.bool))
    chain = t.restricted(torch.zeros(6, dtype=torch.long))
    assert chain.indptr.tolist() == [0] * 7 and chain.indices.numel() == 0 and chain.values.numel() == 0
    res = M.modified_policy_iteration(t, 1e-6)
    assert res.converged and torch.equal(res.v, M.value_iteration(t, 1e-6).v)


# ---------------------------------------------------------------- game trees

def test_expectimax_and_minimax():
    # The lecture's tree: a max root over three min (or chance) nodes.
    leaves = [[3, 12, 8], [2, 4, 6], [14, 5, 2]]
    mm = M.Node.max([M.Node.min(l) for l in leaves])
    full = M.minimax(mm, alpha_beta=False)
    ab = M.minimax(mm)
    assert (full.value, full.action) == (3, 0) and (ab.value, ab.action) == (3, 0)
    assert full.nodes == 13 and ab.nodes < full.nodes
    assert M.expectimax(mm).value == 3
    ex = M.Node.max([M.Node.chance(l) for l in leaves])
    res = M.expectimax(ex)
    assert res.action == 0 and abs(res.value - 23 / 3) < 1e-12
    weighted = M.Node.chance([M.Node.max([1, 5]), M.Node.min([4, 10])], probs=[0.25, 0.75])
    assert abs(M.expectimax(weighted).value - (0.25 * 5 + 0.75 * 4)) < 1e-12
    assert M.expectimax(7).value == 7
    with pytest.raises(ValueError, match="chance"):
        M.minimax(ex)
    with pytest.raises(ValueError, match="sum to 1"):
        M.Node.chance([1, 2], probs=[0.5, 0.6])
    with pytest.raises(ValueError, match="kind"):
        M.Node("avg", [1])
    # fastpt's own message: Python's "'>' not supported between 'str' and 'float'" is a
    # TypeError too, and would pass a bare pytest.raises(TypeError) without any check
    with pytest.raises(TypeError, match="a game tree node must be a Node or a number, got str"):
        M.expectimax(M.Node.max(["x"]))
    # numpy scalars are numbers too; +inf and -inf both reachable have no expectation
    assert M.expectimax(M.Node.max([np.float32(1.5), np.int64(2)])).value == 2
    with pytest.raises(ValueError, match="both \\+inf and -inf"):
        M.expectimax(M.Node.chance([math.inf, -math.inf]))
    assert M.expectimax(M.Node.chance([math.inf, 3.0], probs=[0.0, 1.0])).value == 3.0
