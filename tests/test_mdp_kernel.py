"""The value-iteration kernel (fastpt.ops.value_iteration): Jacobi and Gauss-Seidel sweeps, dense
and sparse, against the plain-numpy reference; its input checks, opcheck and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastpt import mdp as M
from fastpt.ops import value_iteration as vi_op
from mdp_util import GS_PHASES, as_dense_mdp, np_bellman, np_bellman_gs, np_dense, np_sweep_csr, small_random_mdp


# ---------------------------------------------------------------- the kernel

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sparse", [True, False])
def test_sweep_matches_numpy(cpu_capability, dtype, sparse):
    for S, A, K in ((1, 1, 1), (37, 3, 5), (300, 4, 17), (600, 2, 33)):
        m = small_random_mdp(S, A, K, seed=S, dtype=dtype)
        if not sparse:
            m = as_dense_mdp(m)
        p, r = np_dense(m), m.reward.double().numpy()
        v = torch.randn(S, dtype=torch.float64)
        want_v, want_pol, want_q = np_bellman(p, r, m.gamma, v.numpy())
        out = vi_op(m.transitions(), m.reward, v.to(dtype), m.gamma, return_q=True)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        np.testing.assert_allclose(out.q.double().numpy(), want_q, rtol=tol, atol=tol)
        np.testing.assert_allclose(out.v.double().numpy(), want_v, rtol=tol, atol=tol)
        if dtype == torch.float64:
            assert np.array_equal(out.policy.numpy(), want_pol)
        d = want_v - v.to(dtype).double().numpy()
        np.testing.assert_allclose(out.dv[0].numpy(), [d.min(), d.max()], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_sweep_rows_of_every_length(cpu_capability, dtype):
    # Row lengths 1..40 in random order: every split of the vectorised rows into full
    # groups (16 and 4 successors) and a masked tail, in both index widths.
    S, A = 120, 3
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 41, (S * A,), generator=gen)
    lengths[:40] = torch.arange(1, 41)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    idx = torch.cat([torch.randperm(S, generator=gen)[:n].sort().values for n in lengths.tolist()])
    w = torch.rand(int(indptr[-1]), generator=gen, dtype=torch.float64) + 1e-3
    rows = torch.repeat_interleave(torch.arange(S * A), lengths)
    w = w / torch.zeros(S * A, dtype=torch.float64).index_add_(0, rows, w)[rows]
    reward = torch.rand(S, A, generator=gen, dtype=torch.float64)
    v = torch.randn(S, generator=gen, dtype=torch.float64)
    for index_dtype in (torch.int32, torch.int64):
        m = M.MDP.from_csr(indptr, idx.to(index_dtype), w.to(dtype), S, A, reward, 0.9, dtype=dtype)
        want_v, want_pol, want_q = np_bellman(np_dense(m), reward.numpy(), m.gamma, v.numpy())
        out = vi_op(m.transitions(), m.reward, v.to(dtype), m.gamma, return_q=True)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        np.testing.assert_allclose(out.q.double().numpy(), want_q, rtol=tol, atol=tol)
        np.testing.assert_allclose(out.v.double().numpy(), want_v, rtol=tol, atol=tol)


@pytest.mark.parametrize("sparse", [True, False])
def test_several_sweeps_gauss_seidel_and_partitions(cpu_capability, sparse):
    m = small_random_mdp(700, 3, 9, seed=3)  # 16 Gauss-Seidel phases of 43-44 states
    if not sparse:
        m = as_dense_mdp(m)
    p, r, g = np_dense(m), m.reward.numpy(), m.gamma
    v0 = np.random.default_rng(0).standard_normal(700)
    # k Jacobi sweeps in one call (odd and even k: the ping-pong must end in v_out)
    for k in (2, 3):
        v = v0
        for _ in range(k):
            v = np_bellman(p, r, g, v)[0]
        out = vi_op(m.transitions(), m.reward, torch.from_numpy(v0), g, sweeps=k)
        np.testing.assert_allclose(out.v.numpy(), v, rtol=1e-12, atol=1e-12)
        assert not torch.isnan(out.dv).any()
    # Gauss-Seidel, two sweeps
    v = v0
    for _ in range(2):
        v, pol = np_bellman_gs(p, r, g, v)
    out = vi_op(m.transitions(), m.reward, torch.from_numpy(v0), g, sweeps=2, gauss_seidel=True)
    np.testing.assert_allclose(out.v.numpy(), v, rtol=1e-12, atol=1e-12)
    assert np.array_equal(out.policy.numpy(), pol)
    threads = torch.get_num_threads()
    try:  # fixed phases and blocks: the same bits whatever the thread count
        torch.set_num_threads(1)
        one = vi_op(m.transitions(), m.reward, torch.from_numpy(v0), g, sweeps=2, gauss_seidel=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.v, out.v) and torch.equal(one.dv, out.dv)
    # a block of states [100, 450) of the MDP, as one rank of a partition sees it
    lo, hi = 100, 450
    want = np_bellman(p, r, g, v0)[0][lo:hi]
    if sparse:
        A = m.num_actions
        part = (m.indptr[lo * A:hi * A + 1], m.indices, m.values)
    else:
        part = m.p[:, lo:hi, :]
    out = vi_op(part, m.reward[lo:hi], torch.from_numpy(v0), g, first_state=lo)
    np.testing.assert_allclose(out.v.numpy(), want, rtol=1e-12, atol=1e-12)


def test_gauss_seidel_phases_of_several_blocks(cpu_capability):
    """Phases of 3 blocks of 256 states (the last one short), the whole MDP and a partition of
    it, against the numpy rule; the same bits with 1 and 2 threads."""
    S, A = 16 * 514 + 5, 3  # phases of 514-515 states
    m = M.random_sparse_mdp(S, A, 9, seed=4, gamma=0.9)
    indptr, idx, val = m.indptr.numpy(), m.indices.long().numpy(), m.values.numpy()
    r, g = m.reward.numpy(), m.gamma
    v0 = np.random.default_rng(1).standard_normal(S)
    want = v0
    for _ in range(2):
        want, pol = np_sweep_csr(indptr, idx, val, r, g, want, phases=GS_PHASES)
    jacobi = np_sweep_csr(indptr, idx, val, r, g, v0)[0]
    assert np.abs(np_sweep_csr(indptr, idx, val, r, g, v0, phases=GS_PHASES)[0] - jacobi).max() > 1e-6
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(vi_op(m.transitions(), m.reward, torch.from_numpy(v0), g, sweeps=2,
                              gauss_seidel=True))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(outs[0].v.numpy(), want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(outs[0].policy.numpy(), pol)
    assert torch.equal(outs[0].v, outs[1].v) and torch.equal(outs[0].dv, outs[1].dv)
    # a rank's states [lo, hi): phases over its own states, the others fixed at v0
    lo, hi = 1000, 4000
    part_ptr = indptr[lo * A:hi * A + 1]
    want, pol = np_sweep_csr(part_ptr, idx, val, r[lo:hi], g, v0, first=lo, phases=GS_PHASES)
    out = vi_op((m.indptr[lo * A:hi * A + 1], m.indices, m.values), m.reward[lo:hi],
                torch.from_numpy(v0), g, gauss_seidel=True, first_state=lo)
    np.testing.assert_allclose(out.v.numpy(), want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(out.policy.numpy(), pol)


def test_gauss_seidel_value_iteration_is_epsilon_optimal():
    """The sup rule holds for the Gauss-Seidel sweep too (the returned V within eps / 2 of V*,
    the greedy policy eps-optimal), and on a random MDP it needs fewer sweeps than Jacobi."""
    m = M.random_sparse_mdp(20_000, 4, 16, seed=0, gamma=0.9)
    eps = 1e-6
    v_star = M.value_iteration(m, 1e-12).v
    jacobi = M.value_iteration(m, eps)
    gs = M.value_iteration(m, eps, gauss_seidel=True)
    assert gs.converged and gs.iterations < 0.75 * jacobi.iterations
    assert float((gs.v - v_star).abs().max()) < eps / 2
    v_pi = M.policy_evaluation(m, gs.policy, epsilon=1e-10).v
    assert float((v_star - v_pi).max()) < eps
    thr = eps * (1 - m.gamma) / (2 * m.gamma)
    assert gs.history[-1] < thr and all(h >= thr for h in gs.history[:-1])


def test_mdp_command_gauss_seidel(capsys):
    from fastpt.cli import main
    assert main(["mdp", "--states", "3000", "--gauss-seidel"]) == 0
    out = capsys.readouterr().out
    assert "value iteration (Gauss-Seidel, sup rule" in out and "converged True" in out
    assert main(["mdp", "--states", "3000", "--gauss-seidel", "--stop", "span"]) == 2
    assert "Jacobi" in capsys.readouterr().err


def test_sweeps_stop_at_tolerance():
    m = small_random_mdp(50, 2, 4)
    out = vi_op(m.transitions(), m.reward, torch.zeros(50, dtype=torch.float64), m.gamma,
                sweeps=500, tol=1e-3)
    ran = int((~torch.isnan(out.dv[:, 0])).sum())
    assert 1 < ran < 500
    res = torch.maximum(-out.dv[:ran, 0], out.dv[:ran, 1])
    assert res[-1] < 1e-3 and (res[:-1] >= 1e-3).all()
    assert torch.isnan(out.dv[ran:]).all()


def test_kernel_bad_input():
    m = small_random_mdp(10, 2, 3)
    v = torch.zeros(10, dtype=torch.float64)
    t = m.transitions()
    with pytest.raises(ValueError, match="gamma"):
        vi_op(t, m.reward, v, 1.5)
    with pytest.raises(ValueError, match="gamma"):
        vi_op(t, m.reward, v, 0.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        vi_op(t, m.reward.half(), v.half(), 0.9)
    with pytest.raises(TypeError, match="dtype"):
        vi_op(t, m.reward, v.float(), 0.9)
    with pytest.raises(ValueError, match="indptr"):
        vi_op((t[0][:-1], t[1], t[2]), m.reward, v, 0.9)
    with pytest.raises(ValueError, match=r"successor indices must be in \[0, 10\)"):
        vi_op((t[0], t[1] + 5, t[2]), m.reward, v, 0.9)
    with pytest.raises(ValueError, match="sweeps > 1"):
        vi_op(t, m.reward[:5], v, 0.9, sweeps=2)
    with pytest.raises(ValueError, match="within"):
        vi_op(t, m.reward, v, 0.9, first_state=3)
    d = as_dense_mdp(m)
    with pytest.raises(ValueError, match="p must have shape"):
        vi_op(d.p[:, :, :5], d.reward, v, 0.9)
    # NaN / inf values: the max over actions would skip a NaN Q and report -inf, converged
    v_nan, r_inf = v.clone(), m.reward.clone()
    v_nan[4], r_inf[2, 1] = float("nan"), float("inf")
    for trans in (t, d.p):
        with pytest.raises(ValueError, match=r"v\[4\] is nan"):
            vi_op(trans, m.reward, v_nan, 0.9)
        with pytest.raises(ValueError, match=r"reward\[2, 1\] is inf"):
            vi_op(trans, r_inf, v, 0.9)
    p_nan, vals_nan = d.p.clone(), t[2].clone()
    p_nan[1, 3, 2], vals_nan[7] = float("nan"), float("nan")
    with pytest.raises(ValueError, match=r"transitions\[1, 3, 2\] is nan"):
        vi_op(p_nan, m.reward, v, 0.9)
    with pytest.raises(ValueError, match=r"values\[7\] is nan"):
        vi_op((t[0], t[1], vals_nan), m.reward, v, 0.9)
    with pytest.raises(ValueError, match=r"v0\[4\] is nan"):
        M.value_iteration(m, v0=v_nan, gauss_seidel=True)
    with pytest.raises(ValueError, match=r"v0\[4\] is nan"):
        M.policy_evaluation(m, torch.zeros(10, dtype=torch.int64), v0=v_nan)


def test_sparse_op_checks_the_csr_itself():
    """The registered op reads V at the CSR's indices without bounds checks, so it checks the
    arrays itself (once per set, remembered): bad arrays are a ValueError, never a crash."""
    op = torch.ops.fastpt.value_iteration_sparse
    r, v = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    vals = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"successor indices must be in \[0, 2\)"):
        op(torch.tensor([0, 2]), torch.tensor([0, 10**9]), vals, r, v, 0.9)
    with pytest.raises(ValueError, match="indptr must point within the 2 indices"):
        op(torch.tensor([0, 10**9]), torch.tensor([0, 1]), vals, r, v, 0.9)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(torch.tensor([0, 2, 1]), torch.tensor([0, 1]), vals, torch.zeros(2, 1, dtype=torch.float64), v, 0.9)
    # a checked set is remembered, and an in-place write to it is checked again
    indptr, indices = torch.tensor([0, 2]), torch.tensor([0, 1])
    assert op(indptr, indices, vals, r, v, 0.9)[0].tolist() == [0.0]
    indices[1] = 7
    with pytest.raises(ValueError, match="successor indices"):
        op(indptr, indices, vals, r, v, 0.9)
    # first_state near 2**63: the range check must not overflow
    d = torch.full((1, 2, 4), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="within"):
        vi_op(d[:, :1], torch.zeros(1, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
              0.9, first_state=2**63 - 1)


def test_opcheck_and_compile():
    m = small_random_mdp(20, 3, 4)
    v = torch.randn(20, dtype=torch.float64)
    d = as_dense_mdp(m)
    torch.library.opcheck(torch.ops.fastpt.value_iteration_sparse,
                          (*m.transitions(), m.reward, v, 0.9, 2, False, True, 0.0, False, 0),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastpt.value_iteration_dense,
                          (d.p, d.reward, v, 0.9, 1, True, False, 0.0, True, 0),
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True)
    def two_sweeps(p, r, v):
        v1 = torch.ops.fastpt.value_iteration_dense(p, r, v, 0.9)[0]
        return torch.ops.fastpt.value_iteration_dense(p, r, v1, 0.9)[0]

    want = vi_op(d.p, d.reward, v, 0.9, sweeps=2).v
    torch.testing.assert_close(two_sweeps(d.p, d.reward, v), want, rtol=1e-12, atol=1e-12)
