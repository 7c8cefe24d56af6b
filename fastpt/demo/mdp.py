"""Section "mdp": value iteration on Russell & Norvig's 4x3 gridworld (values and policy as
a heat map) and on a large random sparse MDP (sweeps and time), with fastpt's fused
Bellman-sweep kernel (fastpt.mdp)."""

from __future__ import annotations

import time

from fastpt.demo import plots

HEADERS = ["MDP", "states", "actions", "nonzeros", "epsilon", "sweeps", "residual", "build s", "solve s"]
GRID_EPSILON = 1e-6  # the gridworld's values to 6 decimals, whatever --mdp-epsilon


def run(ctx, sec) -> None:
    from fastpt import mdp
    cfg = ctx.config
    rows = []
    start = time.perf_counter()
    grid = mdp.gridworld_4x3()
    built = time.perf_counter()
    res = mdp.value_iteration(grid.mdp, GRID_EPSILON)
    solved = time.perf_counter()
    sec.code(grid.render(res.v, res.policy))
    rows.append(["4x3 gridworld (gamma 1, living reward -0.04)", len(grid.cells), 4, "-",
                 f"{GRID_EPSILON:g}", res.iterations, f"{res.residual:.1e}", f"{built - start:.3f}",
                 f"{solved - built:.3f}"])
    plots.gridworld_values(ctx.path("gridworld.png"), grid, res.v, res.policy)
    sec.image("gridworld.png", "gridworld state values and greedy policy")

    start = time.perf_counter()
    m = mdp.random_sparse_mdp(cfg.mdp_states, cfg.mdp_actions, cfg.mdp_successors, cfg.seed,
                              gamma=cfg.mdp_gamma)
    built = time.perf_counter()
    res = mdp.value_iteration(m, cfg.mdp_epsilon)
    solved = time.perf_counter()
    if not res.converged:
        raise RuntimeError(f"value iteration did not converge (residual {res.residual:.2e})")
    nnz = cfg.mdp_states * cfg.mdp_actions * cfg.mdp_successors
    rows.append([f"random sparse (gamma {cfg.mdp_gamma:g}, {cfg.mdp_successors} successors)",
                 f"{cfg.mdp_states:,}", cfg.mdp_actions, f"{nnz:,}", f"{cfg.mdp_epsilon:g}",
                 res.iterations, f"{res.residual:.1e}", f"{built - start:.2f}", f"{solved - built:.2f}"])
    sec.table(HEADERS, rows, caption=(
        "Value iteration to each row's epsilon by the sup-norm rule (gamma < 1: sweeps stop "
        "below epsilon (1 - gamma) / (2 gamma), and the greedy policy is epsilon-optimal; "
        "gamma 1: below epsilon), fp64. More: `fastpt mdp --help`, `fastpt bench --ops "
        "value_iteration_sparse`."))
