"""fastpt.mdp.MDP's input formats (dense, torch and scipy sparse, CSR arrays, R(s, a, s')), and
bad MDP, solver and container input that must raise clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastpt import mdp as M
from mdp_util import _p_ok, np_dense, np_policy_value, small_random_mdp


# ---------------------------------------------------------------- MDP input formats

def test_input_formats_agree():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    base = small_random_mdp(25, 3, 4, seed=11)
    p = np_dense(base)
    r = base.reward
    want = M.value_iteration(base, 1e-10).v
    per_action = [torch.from_numpy(p[a]).to_sparse_csr() for a in range(3)]
    stacked = torch.from_numpy(p.reshape(75, 25)).to_sparse_csr()
    variants = [
        M.MDP(torch.from_numpy(p), r, base.gamma),
        M.MDP(p, r.numpy(), base.gamma),
        M.MDP(per_action, r, base.gamma),
        M.MDP(stacked, r, base.gamma),
        M.MDP([scipy_sparse.csr_matrix(p[a]) for a in range(3)], r, base.gamma),
        M.MDP(scipy_sparse.csr_matrix(p.reshape(75, 25)), r, base.gamma),
        M.MDP.from_csr(stacked.crow_indices(), stacked.col_indices(), stacked.values(), 25, 3, r,
                       base.gamma, order="action"),
    ]
    for m in variants:
        torch.testing.assert_close(M.value_iteration(m, 1e-10).v, want, rtol=1e-9, atol=1e-9)
    # R(s, a, s') reduced to sum_s' P R: dense, per-nonzero and sparse with P's pattern
    r3 = np.random.default_rng(1).standard_normal((3, 25, 25)) * (p > 0)
    want_r = np.einsum("ast,ast->sa", p, r3)
    dense = M.MDP(p, r3, base.gamma)
    np.testing.assert_allclose(dense.reward.numpy(), want_r, rtol=1e-12, atol=1e-14)
    sp = M.MDP(per_action, [torch.from_numpy(r3[a]).to_sparse_csr() for a in range(3)], base.gamma)
    np.testing.assert_allclose(sp.reward.numpy(), want_r, rtol=1e-12, atol=1e-14)
    gathered = M.MDP(per_action, r3, base.gamma)
    np.testing.assert_allclose(gathered.reward.numpy(), want_r, rtol=1e-12, atol=1e-14)
    # indices narrowed to int32, no dense S x S anywhere in a sparse MDP
    assert base.indices.dtype == torch.int32 and base.indptr.dtype == torch.int32
    big = M.random_sparse_mdp(100_000, 2, 3, seed=0)
    assert big.p is None and max(t.numel() for t in (big.indptr, big.indices, big.values)) <= 600_000


def test_terminal_states_and_float32():
    g = M.gridworld_4x3(dtype=torch.float32)
    m = g.mdp
    assert m.is_sparse is False and bool(m.terminal[g.state(4, 3)])
    assert float(m.p[:, g.state(4, 3)].abs().sum()) == 0  # exits
    res = M.value_iteration(m, 1e-5)
    assert abs(float(res.v[g.state(1, 1)]) - 0.705) < 1e-3
    sp = M.MDP([m.p[a].to_sparse_csr() for a in range(4)], m.reward, 1.0,
               terminal=m.terminal, dtype=torch.float32)
    torch.testing.assert_close(M.value_iteration(sp, 1e-5).v, res.v, rtol=1e-5, atol=1e-5)


def test_random_sparse_mdp_generator():
    a = M.random_sparse_mdp(1000, 3, 7, seed=5)
    b = M.random_sparse_mdp(1000, 3, 7, seed=5)
    c = M.random_sparse_mdp(1000, 3, 7, seed=6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)
    assert a.nnz == 1000 * 3 * 7 and a.reward.shape == (1000, 3)
    sums = a.values.view(-1, 7).sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    with pytest.raises(ValueError, match="num_states, num_actions and successors must be >= 1, got 0, 3, 7"):
        M.random_sparse_mdp(0, 3, 7)


# ---------------------------------------------------------------- bad input -> clear errors

def test_bad_mdp_input():
    r = torch.zeros(3, 2)
    p = _p_ok()
    bad = p.clone()
    bad[1, 2, 0] = 0.4
    with pytest.raises(ValueError, match=r"state 2, action 1 sum to 0\.9"):
        M.MDP(bad, r, 0.9)
    bad = p.clone()
    bad[0, 1, 0], bad[0, 1, 2] = -0.1, 0.6
    with pytest.raises(ValueError, match=r"state 1, action 0\) = -0\.1.*>= 0"):
        M.MDP(bad, r, 0.9)
    bad = p.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        M.MDP(bad, r, 0.9)
    r_nan = r.clone()
    r_nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match="reward of state 1, action 1 is nan"):
        M.MDP(p, r_nan, 0.9)
    for gamma in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match="gamma must be in"):
            M.MDP(p, r, gamma)
    with pytest.raises(ValueError, match="gamma = 1 needs terminal"):
        M.MDP(p, r, 1.0)
    with pytest.raises(ValueError, match="state 2 cannot reach a terminal"):
        M.MDP(_chain_with_trap(), torch.zeros(3, 1), 1.0, terminal=[0])
    with pytest.raises(ValueError, match="shape"):
        M.MDP(p[:, :, :2], r, 0.9)
    with pytest.raises(ValueError, match="reward must have shape"):
        M.MDP(p, torch.zeros(4, 2), 0.9)
    with pytest.raises(ValueError, match="terminal"):
        M.MDP(p, r, 0.9, terminal=[5])
    with pytest.raises(TypeError, match="dtype"):
        M.MDP(p, r, 0.9, dtype=torch.float16)
    # sparse: the same errors, naming the state and action of the offending row
    crow = torch.tensor([0, 2, 4, 6, 8, 10, 12])
    col = torch.tensor([0, 1] * 6)
    val = torch.full((12,), 0.5, dtype=torch.float64)
    M.MDP.from_csr(crow, col, val, 3, 2, r, 0.9)
    v2 = val.clone()
    v2[7] = 0.3  # row 3 = state 1, action 1
    with pytest.raises(ValueError, match=r"state 1, action 1 sum to 0\.8"):
        M.MDP.from_csr(crow, col, v2, 3, 2, r, 0.9)
    v2 = val.clone()
    v2[4] = -0.5
    with pytest.raises(ValueError, match=r"state 1, action 0\) = -0\.5"):
        M.MDP.from_csr(crow, col, v2, 3, 2, r, 0.9)
    with pytest.raises(ValueError, match="successor 7 of state 0, action 1"):
        M.MDP.from_csr(crow, torch.tensor([0, 1, 0, 7] + [0, 1] * 4), val, 3, 2, r, 0.9)
    with pytest.raises(ValueError, match="indptr"):
        M.MDP.from_csr(crow[:-1], col, val, 3, 2, r, 0.9)
    with pytest.raises(ValueError, match="stacked"):
        M.MDP(torch.eye(5)[:4].to_sparse_csr(), torch.zeros(5), 0.9)


def test_from_csr_reward_per_nonzero_must_be_explicit_when_ambiguous():
    """4 states, 2 actions, 4 nonzeros: a 4-entry reward is R(s) or one R(s, a, s') per
    nonzero; inferring either would silently read the other."""
    args = ([0, 1, 2, 3, 4, 4, 4, 4, 4], [2, 3, 3, 2], [1.0] * 4, 4, 2)
    r = torch.tensor([10.0, 20, 30, 40])
    with pytest.raises(ValueError, match="ambiguous.*reward_per_nonzero"):
        M.MDP.from_csr(*args, r, 0.9, terminal=[2, 3])
    per_nonzero = M.MDP.from_csr(*args, r, 0.9, terminal=[2, 3], reward_per_nonzero=True)
    assert per_nonzero.reward.tolist() == [[10, 20], [30, 40], [0, 0], [0, 0]]
    per_state = M.MDP.from_csr(*args, r, 0.9, terminal=[2, 3], reward_per_nonzero=False)
    assert per_state.reward.tolist() == [[10, 10], [20, 20], [30, 30], [40, 40]]
    with pytest.raises(ValueError, match="one entry per nonzero"):
        M.MDP.from_csr(*args, torch.zeros(4, 2), 0.9, terminal=[2, 3], reward_per_nonzero=True)


def test_gamma_one_reachability_ignores_stored_zeros():
    """State 0's only stored way to the terminal has probability 0: it cannot reach it."""
    with pytest.raises(ValueError, match="state 0 cannot reach a terminal"):
        M.MDP.from_csr([0, 2, 4], [0, 1, 1, 1], [1.0, 0.0, 0.0, 1.0], 2, 1, [[-1.0], [0.0]], 1.0,
                       terminal=[1])


def _stay_or_exit(stay_reward):
    """State 0: action 0 stays (reward stay_reward), action 1 exits to terminal 1 (reward -1)."""
    p = np.array([[[1.0, 0], [0, 1]], [[0, 1.0], [0, 1]]])
    return M.MDP(p, np.array([[stay_reward, -1.0], [0, 0]]), 1.0, terminal=[1])


def test_proper_policy_and_policy_iteration_at_gamma_one():
    g = M.gridworld_4x3()
    for m in (g.mdp, _stay_or_exit(-0.1)):
        proper = m.proper_policy()
        # a proper policy's chain is absorbed: I - P_pi is invertible, its values finite
        assert np.isfinite(np_policy_value(np_dense(m), m.reward.numpy(), 1.0, proper.numpy())).all()
        M.policy_evaluation(m, proper)
    # greedy for V = 0 would stay in state 0 forever at -0.1 a step; from the proper policy
    # policy iteration finds what value iteration finds
    m = _stay_or_exit(-0.1)
    assert M.policy_iteration(m).v.tolist() == M.value_iteration(m).v.tolist() == [-1.0, 0.0]
    with pytest.raises(ValueError, match="cannot reach a terminal"):
        M.MDP(_chain_with_trap(), torch.zeros(3, 1), 0.9, terminal=[0]).proper_policy()


def test_direct_evaluation_of_an_improper_policy_is_a_value_error():
    m = _stay_or_exit(0.0)
    with pytest.raises(ValueError, match="singular.*never reaches a terminal"):
        M.policy_evaluation(m, [0, 0])
    assert M.policy_evaluation(m, [0, 0], method="iterative").v.tolist() == [0.0, 0.0]


def test_stopping_threshold_below_float32_rounding_warns():
    p = np.array([[[0.5, 0.5], [0, 1]], [[1.0, 0], [0, 1]]])
    r = np.array([[1.0, 0], [0, 2]])
    with pytest.warns(RuntimeWarning, match="within the torch.float32 rounding of a sweep"):
        M.value_iteration(M.MDP(p, r, 0.99, dtype=torch.float32), 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = M.value_iteration(M.MDP(p, r, 0.99), 1e-6)  # float64: no warning, and eps/2 holds
    assert abs(float(res.v[0]) - 198.01980198) < 5e-7


def test_bad_solver_and_container_arguments():
    m = small_random_mdp(6, 2, 2)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        M.value_iteration(m, max_iter=10.0)
    with pytest.raises(TypeError, match="horizon must be an int"):
        M.backward_induction(m, 2.0)
    with pytest.raises(ValueError, match="policy actions must be in"):
        m.restricted(torch.full((6,), 5))
    with pytest.raises(ValueError, match="transitions is empty"):
        M.MDP([], torch.zeros(2, 1), 0.9)
    with pytest.raises(ValueError, match=r"matrix 1 of the sequence has shape \(3, 3\)"):
        M.MDP([np.eye(2), np.eye(3)], torch.zeros(2, 2), 0.9)


def _chain_with_trap():
    """0 terminal; 1 -> 0; 2 -> 2 forever (cannot reach the terminal)."""
    p = torch.zeros(1, 3, 3, dtype=torch.float64)
    p[0, 1, 0] = 1
    p[0, 2, 2] = 1
    p[0, 0, 0] = 1
    return p
