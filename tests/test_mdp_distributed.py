"""fastpt.mdp.distributed_value_iteration: two gloo ranks started by torchrun agree with the
single-process solver, and a call without a process group is refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpt import mdp as M
from mdp_util import as_dense_mdp, np_dense, small_random_mdp


# ---------------------------------------------------------------- distributed (2 x gloo)

def test_distributed_value_iteration_two_ranks(tmp_path):
    worker = Path(__file__).with_name("mdp_distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(worker), str(tmp_path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                             cwd=str(tmp_path))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in 240 s:\n{e.stdout}\n{e.stderr}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for kind in ("sparse", "dense", "terminals"):
        for stop in ("sup", "span"):
            got = [torch.load(tmp_path / f"{kind}-{stop}-rank{r}.pt") for r in range(2)]
            m = _dist_mdp(kind)
            want = M.value_iteration(m, 1e-8, stop=stop)
            for g in got:
                assert g["iterations"] == want.iterations
                torch.testing.assert_close(g["v"], want.v, rtol=0, atol=1e-12)
                assert torch.equal(g["policy"], want.policy)
    for r in range(2):
        checks = torch.load(tmp_path / f"checks-rank{r}.pt")
        assert checks["v0_kept"], f"rank {r}'s v0 was overwritten"
        assert "the values overflowed" in checks["overflow"], checks["overflow"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist_mdp(kind: str) -> M.MDP:
    m = M.random_sparse_mdp(1001, 3, 5, seed=2, gamma=0.9)
    if kind == "terminals":
        return M.MDP(torch.from_numpy(np_dense(m)), m.reward.double(), m.gamma, terminal=[0, 500, 1000])
    return m if kind == "sparse" else as_dense_mdp(m)


def test_distributed_needs_init():
    with pytest.raises(RuntimeError, match="init_process_group"):
        M.distributed_value_iteration(small_random_mdp())
