"""The demo's PNG plots. matplotlib's object API with the Agg canvas: no pyplot, no global
backend switch, no window, safe in a process that plots elsewhere too."""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastpt._atomic import atomic_write


def _save(fig: Figure, path: str) -> str:
    """Saves the PNG atomically (a temporary beside ``path``, then renamed over it)."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path


def loss_curves(path: str, curves: dict[str, list[tuple[int, float]]]) -> str:
    """One panel per run: training loss against the optimizer step."""
    fig = Figure(figsize=(5 * len(curves), 3.6))
    for i, (name, points) in enumerate(curves.items(), 1):
        ax = fig.add_subplot(1, len(curves), i)
        ax.plot(*zip(*points))
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def speedup_bars(path: str, labels: list[str], ratios: dict[str, list[float | None]]) -> str:
    """Grouped bars of fastpt's speed-up (baseline time / fastpt time) per case and baseline."""
    fig = Figure(figsize=(max(6, 1.1 * len(labels) + 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(len(ratios), 1)
    for j, (name, values) in enumerate(ratios.items()):
        xs = [i + (j - (len(ratios) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=f"vs {name}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("speed-up of fastpt (x)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def finetune_comparison(path: str, rows: list[dict], labels: dict[str, str]) -> str:
    """Test accuracy and trainable parameters (log scale) per strategy."""
    names = [labels.get(r["strategy"], r["strategy"]) for r in rows]
    fig = Figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.barh(names, [100 * r["accuracy"] for r in rows], color="tab:blue")
    ax.axvline(50, color="gray", linestyle="--", linewidth=0.8)   # chance on two classes
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.invert_yaxis()
    ax = fig.add_subplot(1, 2, 2)
    ax.barh(names, [max(r["trainable"], 1) for r in rows], color="tab:orange")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_yticklabels([])
    ax.invert_yaxis()
    return _save(fig, path)


def gridworld_values(path: str, grid, v, policy) -> str:
    """Heat map of the gridworld's state values, the greedy move in each cell, the wall
    hatched and the terminal states framed."""
    values = [[math.nan] * grid.width for _ in range(grid.height)]
    for s, (x, y) in enumerate(grid.cells):
        values[grid.height - y][x - 1] = float(v[s])
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdYlGn", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="value")
    arrows = "↑↓←→"
    for s, (x, y) in enumerate(grid.cells):
        row, col = grid.height - y, x - 1
        terminal = (x, y) in grid.terminals
        mark = "" if terminal else "\n" + arrows[int(policy[s])]
        ax.text(col, row, f"{float(v[s]):+.3f}{mark}", ha="center", va="center", fontsize=10)
        if terminal:
            ax.add_patch(_frame(col, row))
    wx, wy = grid.wall
    ax.add_patch(_frame(wx - 1, grid.height - wy, hatch="///", fill=True))
    ax.set_xticks(range(grid.width))
    ax.set_xticklabels([str(x) for x in range(1, grid.width + 1)])
    ax.set_yticks(range(grid.height))
    ax.set_yticklabels([str(y) for y in range(grid.height, 0, -1)])
    ax.set_title("4x3 gridworld: V* and greedy policy")
    return _save(fig, path)


def _frame(col: int, row: int, hatch: str | None = None, fill: bool = False):
    from matplotlib.patches import Rectangle
    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=fill, facecolor="lightgray",
                     edgecolor="black", linewidth=2, hatch=hatch)
