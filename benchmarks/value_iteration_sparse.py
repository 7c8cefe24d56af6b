"""Value iteration, one Bellman sweep of a random sparse MDP (fastpt.mdp.random_sparse_mdp):
S states, A actions, K successors per (state, action), float64.

Implementations: ``fastpt`` (the fused kernel: one pass over the CSR, max over actions,
greedy policy and the change of V in the same pass); ``eager`` = ``torch_csr``: torch's CSR
matrix-vector product (int32 indices, as fastpt reads them: torch's product is ~1.3-2x faster
with them than with int64), then R + gamma * Q.view(S, A) and max over actions;
``scipy``: the same with scipy.sparse (int32 indices, one thread).

Minimal bytes: the CSR as fastpt stores it (int32 column indices and row pointers, float64
values), R, V read once, V and the policy (int64) written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.mdp import MDP, random_sparse_mdp

GAMMA = 0.9


@dataclass
class Case:
    mdp: MDP
    v: torch.Tensor
    csr: torch.Tensor  # (S*A, S) torch CSR, state-major rows
    scipy_csr: object | None


def make_case(shapes, dtype) -> Case:
    S, A, K = shapes["P"]
    m = random_sparse_mdp(S, A, K, seed=0, gamma=GAMMA, dtype=dtype)
    v = torch.rand(S, dtype=dtype, generator=torch.Generator().manual_seed(1))
    csr = torch.sparse_csr_tensor(m.indptr.int(), m.indices.int(), m.values, (S * A, S),
                                  check_invariants=False)
    try:
        import scipy.sparse
        sp = scipy.sparse.csr_matrix((m.values.numpy(), m.indices.numpy(), m.indptr.numpy()),
                                     shape=(S * A, S))
    except ImportError:
        sp = None
    return Case(m, v, csr, sp)


def make_inputs(shapes, dtype, requires_grad):
    return Inputs(args=(make_case(shapes, dtype),))


def fastpt_sweep(c: Case):
    v, policy, _, _ = torch.ops.fastpt.value_iteration_sparse(
        c.mdp.indptr, c.mdp.indices, c.mdp.values, c.mdp.reward, c.v, c.mdp.gamma)
    return v, policy


def torch_csr_sweep(c: Case):
    S, A = c.mdp.num_states, c.mdp.num_actions
    q = c.mdp.reward + c.mdp.gamma * (c.csr @ c.v).view(S, A)
    best = q.max(1)
    return best.values, best.indices


def scipy_sweep(c: Case):
    if c.scipy_csr is None:
        raise RuntimeError("scipy is not installed (pip install scipy)")
    S, A = c.mdp.num_states, c.mdp.num_actions
    q = c.mdp.reward.numpy() + c.mdp.gamma * (c.scipy_csr @ c.v.numpy()).reshape(S, A)
    return torch.from_numpy(q.max(1)), torch.from_numpy(q.argmax(1))


def sweep_bytes(m: MDP) -> int:
    S = m.num_states
    return (m.indices.numel() * m.indices.element_size() + m.values.numel() * m.values.element_size()
            + m.indptr.numel() * m.indptr.element_size() + m.reward.numel() * m.reward.element_size()
            + 2 * S * m.values.element_size() + S * 8)


def nbytes(inputs, outputs, mode) -> int:
    return sweep_bytes(inputs.args[0].mdp)


SPEC = OpSpec(
    name="value_iteration_sparse",
    shapes={"full": {"P": (200_000, 4, 16)}, "quick": {"P": (20_000, 4, 16)}},
    make_inputs=make_inputs,
    fastpt=fastpt_sweep,
    eager=torch_csr_sweep,
    baselines={"scipy": scipy_sweep},
    dtypes=("fp64",),
    modes=("fwd",),
    nbytes=nbytes,
    compile=False,
)
