"""Value iteration, one Bellman sweep of a dense MDP: P (A, S, S) random row-stochastic,
R (S, A), float64.

Implementations: ``fastpt`` (fused kernel); ``eager``: torch, P.view(A*S, S) @ V (one gemv),
then R + gamma * Q and max over actions; ``numpy``: the same in numpy; ``pymdptoolbox``:
its ValueIteration Bellman operator (a gemv per action, then max), when the package imports.

Minimal bytes: P, R and V read once, V and the policy (int64) written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastpt.benchmarks.harness import Inputs, OpSpec
from fastpt.mdp import MDP

GAMMA = 0.9


@dataclass
class Case:
    mdp: MDP
    v: torch.Tensor
    toolbox: object | None


def make_inputs(shapes, dtype, requires_grad):
    A, S, _ = shapes["P"]
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(A, S, S, dtype=torch.float64, generator=gen)
    p /= p.sum(-1, keepdim=True)
    r = torch.rand(S, A, dtype=torch.float64, generator=gen)
    m = MDP(p.to(dtype), r, GAMMA, dtype=dtype)
    v = torch.rand(S, dtype=dtype, generator=gen)
    try:
        import mdptoolbox.mdp
        tb = mdptoolbox.mdp.ValueIteration(m.p.numpy(), m.reward.numpy(), GAMMA, max_iter=1)
        tb.V = v.numpy().copy()
    except ImportError:
        tb = None
    return Inputs(args=(Case(m, v, tb),))


def fastpt_sweep(c: Case):
    v, policy, _, _ = torch.ops.fastpt.value_iteration_dense(c.mdp.p, c.mdp.reward, c.v, c.mdp.gamma)
    return v, policy


def torch_sweep(c: Case):
    A, S = c.mdp.num_actions, c.mdp.num_states
    q = c.mdp.reward + c.mdp.gamma * (c.mdp.p.view(A * S, S) @ c.v).view(A, S).t()
    best = q.max(1)
    return best.values, best.indices


def numpy_sweep(c: Case):
    A, S = c.mdp.num_actions, c.mdp.num_states
    q = c.mdp.reward.numpy() + c.mdp.gamma * (c.mdp.p.numpy().reshape(A * S, S) @ c.v.numpy()).reshape(A, S).T
    return torch.from_numpy(q.max(1)), torch.from_numpy(q.argmax(1))


def toolbox_sweep(c: Case):
    if c.toolbox is None:
        raise RuntimeError("pymdptoolbox is not installed (pip install pymdptoolbox)")
    policy, v = c.toolbox._bellmanOperator()
    return torch.from_numpy(np.asarray(v)), torch.from_numpy(np.asarray(policy))


def nbytes(inputs, outputs, mode) -> int:
    m = inputs.args[0].mdp
    e = m.p.element_size()
    return m.p.numel() * e + m.reward.numel() * e + 2 * m.num_states * e + m.num_states * 8


SPEC = OpSpec(
    name="value_iteration_dense",
    shapes={"full": {"P": (8, 2000, 2000)}, "quick": {"P": (8, 500, 500)}},
    make_inputs=make_inputs,
    fastpt=fastpt_sweep,
    eager=torch_sweep,
    baselines={"numpy": numpy_sweep, "pymdptoolbox": toolbox_sweep},
    dtypes=("fp64",),
    modes=("fwd",),
    nbytes=nbytes,
    compile=False,
)
