"""Value iteration with the states partitioned across ``torch.distributed`` ranks.

Rank r owns the block of states [r*B, (r+1)*B), B = ceil(S / world): it sweeps only those
rows (the kernel's ``first_state``), then every rank all-gathers the new V (S values, tiny
next to the transition data) and all-reduces the min/max of the change for the stopping
rule, so all ranks stop at the same sweep with the same V as one process would compute
(Jacobi sweeps: the result does not depend on the partition).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastpt.mdp.model import MDP
from fastpt.mdp.solvers import (Result, _check_max_iter, _initial_values, check_extrapolated, check_mdp,
                                check_no_overflow, rounded_threshold, span_change, stop_threshold,
                                warn_below_resolution)


def _local_part(mdp: MDP, lo: int, hi: int):
    """Views of the rows of states [lo, hi) (no copy: CSR row pointers stay absolute)."""
    A = mdp.num_actions
    reward = mdp.reward[lo:hi]
    if mdp.is_sparse:
        return (mdp.indptr[lo * A:hi * A + 1], mdp.indices, mdp.values), reward
    return mdp.p[:, lo:hi, :], reward


def _local_sweep(mdp: MDP, part, reward, v, lo: int, return_q: bool = False):
    if mdp.is_sparse:
        return torch.ops.fastpt.value_iteration_sparse(*part, reward, v, mdp.gamma, 1, False,
                                                       return_q, 0.0, False, lo)
    return torch.ops.fastpt.value_iteration_dense(part, reward, v, mdp.gamma, 1, False, return_q,
                                                  0.0, False, lo)


def _gather(local: torch.Tensor, block: int, S: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    padded = local.new_zeros(block)
    padded[:local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:S].contiguous()


def distributed_value_iteration(mdp: MDP, epsilon: float = 1e-6, max_iter: int = 100_000,
                                stop: str = "sup", *, group=None, v0=None) -> Result:
    """:func:`fastpt.mdp.value_iteration` (same stopping rules) over the ranks of ``group``
    (default: the world; needs ``torch.distributed`` initialised, any backend that has
    all_gather and all_reduce, e.g. gloo). Every rank passes the same MDP (each only reads
    its own rows) and gets the whole V and policy back."""
    check_mdp(mdp)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed_value_iteration needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    threshold = stop_threshold(epsilon, mdp.gamma, stop)
    _check_max_iter(max_iter)
    span = stop == "span"
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    S = mdp.num_states
    block = -(-S // world)
    lo, hi = min(rank * block, S), min((rank + 1) * block, S)
    part, reward = _local_part(mdp, lo, hi)
    v, history, converged = _initial_values(mdp, v0), [], False
    # Same start on every rank (v0 might differ by rounding if computed per rank).
    dist.broadcast(v, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    change = torch.zeros(2, dtype=torch.float64)
    while len(history) < max_iter and not converged:
        v_local, _, dv, _ = _local_sweep(mdp, part, reward, v, lo)
        # [-min dV, max dV]; an empty block must not win the max.
        change.copy_(torch.stack([-dv[0, 0], dv[0, 1]]) if hi > lo else
                     torch.full((2,), -torch.inf, dtype=torch.float64))
        dist.all_reduce(change, op=dist.ReduceOp.MAX, group=group)
        v = _gather(v_local, block, S, group)
        dmin, dmax = -float(change[0]), float(change[1])
        if span:
            dmin, dmax = span_change(torch.tensor([[dmin, dmax]], dtype=torch.float64), mdp)[0].tolist()
        history.append((dmax - dmin if span else max(-dmin, dmax)) + 0.0)  # -0.0 -> 0.0
        check_no_overflow(history[-1:])  # the same reduced value, so every rank stops together
        # v is the same gathered tensor on every rank: so is the rounded threshold
        converged = history[-1] < (threshold if span else rounded_threshold(v, threshold, mdp.gamma))
    if converged:
        warn_below_resolution(v, threshold, mdp.gamma)
    if span and converged and mdp.gamma < 1:
        v = v + mdp.gamma / (1 - mdp.gamma) * (dmax + dmin) / 2
        check_extrapolated(v)
    policy_local = _local_sweep(mdp, part, reward, v, lo)[1]
    policy = _gather(policy_local, block, S, group)
    return Result(v, policy, len(history), history[-1], converged, history)
