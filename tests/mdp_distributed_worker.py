"""Worker for tests/test_mdp_distributed.py::test_distributed_value_iteration_two_ranks,
started by torchrun with 2 processes on gloo: solves the test's MDPs with the states split
across the ranks and saves each rank's result to OUT_DIR/<kind>-<stop>-rank<r>.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastpt import mdp as M


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m = M.random_sparse_mdp(1001, 3, 5, seed=2, gamma=0.9)
    dense = M.MDP(_dense(m), m.reward, m.gamma)
    with_terminals = M.MDP(_dense(m), m.reward, m.gamma, terminal=[0, 500, 1000])
    for kind, mdp in (("sparse", m), ("dense", dense), ("terminals", with_terminals)):
        for stop in ("sup", "span"):
            res = M.distributed_value_iteration(mdp, 1e-8, stop=stop)
            torch.save({"v": res.v, "policy": res.policy, "iterations": res.iterations},
                       Path(out_dir) / f"{kind}-{stop}-rank{rank}.pt")
    # The caller's v0 is read, not overwritten by the broadcast of rank 0's; values that
    # overflow stop every rank with the same error.
    v0 = torch.full((m.num_states,), float(rank), dtype=torch.float64)
    M.distributed_value_iteration(m, 1e-8, v0=v0)
    try:
        M.distributed_value_iteration(M.MDP(_dense(m), torch.full_like(m.reward, 1e308), 0.9), 1e-8)
        overflow = "no error"
    except ValueError as e:
        overflow = str(e)
    torch.save({"v0_kept": bool((v0 == rank).all()), "overflow": overflow},
               Path(out_dir) / f"checks-rank{rank}.pt")
    dist.destroy_process_group()


def _dense(m):
    S, A = m.num_states, m.num_actions
    p = torch.zeros(A, S, S, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(S * A), (m.indptr[1:] - m.indptr[:-1]).long())
    p.index_put_((rows % A, rows // A, m.indices.long()), m.values, accumulate=True)
    return p


if __name__ == "__main__":
    main(sys.argv[1])
