"""Example MDPs: the 4x3 gridworld of Russell & Norvig and a random sparse MDP generator."""

from __future__ import annotations

import torch

from fastpt._checks import check_int
from fastpt._memory import physical_memory
from fastpt.mdp.model import MDP

# Actions of the gridworld: (dx, dy) in Russell & Norvig's coordinates (x right, y up).
GRID_ACTIONS = {"up": (0, 1), "down": (0, -1), "left": (-1, 0), "right": (1, 0)}


class Gridworld:
    """Russell & Norvig's 4x3 world (AIMA, chapter 17): the agent moves in the intended
    direction with probability 1 - noise and to each perpendicular direction with noise / 2;
    bumping into the wall or the edge leaves it in place. Wall at (2, 2); terminal states
    (4, 3) = +1 and (4, 2) = -1; every other state has the living reward. Coordinates (x, y)
    are 1-based, x = column, y = row from the bottom, as in the book.

    ``state(x, y)`` gives the state index, ``cells[i]`` the (x, y) of state i; ``mdp`` is the
    :class:`MDP` (actions in the order of ``GRID_ACTIONS``: up, down, left, right).
    """

    width, height, wall = 4, 3, (2, 2)
    terminals = {(4, 3): 1.0, (4, 2): -1.0}

    def __init__(self, living_reward: float = -0.04, gamma: float = 1.0, noise: float = 0.2,
                 dtype: torch.dtype = torch.float64):
        if not 0 <= noise <= 1:  # (NaN too)
            raise ValueError(f"noise must be in [0, 1] (the probability of slipping sideways), got {noise}")
        self.cells = [(x, y) for y in range(1, self.height + 1) for x in range(1, self.width + 1)
                      if (x, y) != self.wall]
        index = {c: i for i, c in enumerate(self.cells)}
        S, A = len(self.cells), len(GRID_ACTIONS)
        p = torch.zeros(A, S, S, dtype=torch.float64)
        moves = list(GRID_ACTIONS.values())
        for s, (x, y) in enumerate(self.cells):
            for a, (dx, dy) in enumerate(moves):
                for (mx, my), prob in (((dx, dy), 1 - noise), ((dy, dx), noise / 2),
                                       ((-dy, -dx), noise / 2)):
                    target = (x + mx, y + my)
                    p[a, s, index.get(target, s)] += prob
        reward = torch.full((S,), living_reward, dtype=torch.float64)
        for cell, r in self.terminals.items():
            reward[index[cell]] = r
        self.index = index
        self.mdp = MDP(p, reward, gamma, terminal=[index[c] for c in self.terminals], dtype=dtype)

    def state(self, x: int, y: int) -> int:
        if (x, y) not in self.index:
            raise ValueError(f"({x}, {y}) is not a state: the grid is {self.width} x {self.height} "
                             f"from (1, 1), and {self.wall} is the wall")
        return self.index[(x, y)]

    def render(self, v: torch.Tensor, policy: torch.Tensor | None = None) -> str:
        """The grid as text, top row first: values, and arrows of the policy if given."""
        arrows = "^v<>"
        S = len(self.cells)
        if tuple(v.shape) != (S,):
            raise ValueError(f"v must have shape ({S},), one value per state, got {tuple(v.shape)}")
        if policy is not None and (tuple(policy.shape) != (S,) or policy.is_floating_point() or
                                   bool(((policy < 0) | (policy >= len(arrows))).any())):
            raise ValueError(f"policy must be ({S},) action indices in [0, {len(arrows)}), got "
                             f"{policy.dtype} {tuple(policy.shape)}")
        lines = []
        for y in range(self.height, 0, -1):
            row = []
            for x in range(1, self.width + 1):
                if (x, y) == self.wall:
                    row.append("  ####  ")
                    continue
                s = self.index[(x, y)]
                mark = " " if policy is None or (x, y) in self.terminals else arrows[int(policy[s])]
                row.append(f"{float(v[s]):+.3f}{mark} ")
            lines.append(" ".join(row).rstrip())  # no trailing blanks: the text pastes into doctests
        return "\n".join(lines)


def gridworld_4x3(living_reward: float = -0.04, gamma: float = 1.0, noise: float = 0.2,
                  dtype: torch.dtype = torch.float64) -> Gridworld:
    """The 4x3 gridworld (see :class:`Gridworld`)."""
    return Gridworld(living_reward, gamma, noise, dtype)


BYTES_PER_TRANSITION = 48  # random_sparse_mdp's peak per (s, a, successor): int64 draws, their sort, weights


def check_random_mdp_fits(num_states: int, num_actions: int, successors: int) -> None:
    """ValueError when :func:`random_sparse_mdp` of these sizes would need more than this
    machine's memory (it would otherwise fail in the allocator, or be killed, mid-way)."""
    transitions = num_states * num_actions * successors
    need, have = BYTES_PER_TRANSITION * transitions, physical_memory()
    if need > have:
        raise ValueError(f"{num_states} states x {num_actions} actions x {successors} successors = "
                         f"{transitions:,} transitions need about {need / 2**30:,.0f} GiB; this machine "
                         f"has {have / 2**30:,.0f} GiB")


def random_sparse_mdp(num_states: int, num_actions: int, successors: int, seed: int = 0, *,
                      gamma: float = 0.95, dtype: torch.dtype = torch.float64) -> MDP:
    """A random sparse MDP: each (s, a) moves to ``successors`` uniformly drawn states (sorted,
    repeats allowed: their probabilities add) with random probabilities (uniform weights,
    normalised in float64); rewards uniform in [0, 1). Vectorised: S = 200,000, A = 4, 16
    successors (12.8 M nonzeros) take about a second. Same seed, same MDP."""
    S, A, K = (check_int(n, v) for n, v in (("num_states", num_states), ("num_actions", num_actions),
                                             ("successors", successors)))
    check_int("seed", seed)
    if S < 1 or A < 1 or K < 1:
        raise ValueError(f"num_states, num_actions and successors must be >= 1, got {S}, {A}, {K}")
    check_random_mdp_fits(S, A, K)
    gen = torch.Generator().manual_seed(seed)
    rows = S * A
    indices = torch.randint(0, S, (rows, K), generator=gen, dtype=torch.int64)
    indices = indices.sort(dim=1).values.to(torch.int32 if S < 2**31 else torch.int64)
    weights = torch.rand(rows, K, generator=gen, dtype=torch.float64) + 1e-3
    values = (weights / weights.sum(1, keepdim=True)).to(dtype)
    reward = torch.rand(S, A, generator=gen, dtype=torch.float64)
    indptr = torch.arange(0, rows * K + 1, K, dtype=torch.int64)
    return MDP.from_csr(indptr, indices.reshape(-1), values.reshape(-1), S, A, reward, gamma,
                        dtype=dtype)
