"""Expectimax and minimax search on small game trees, as the lectures present them.

A tree is built from :class:`Node` objects: ``Node.max(children)``, ``Node.min(children)``,
``Node.chance(children, probs)`` (uniform when probs is None) and ``Node.leaf(value)``; a
bare number also stands for a leaf. Search is plain recursion: these are the small trees of
the lecture examples, not a game engine.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence, Union

KINDS = ("max", "min", "chance", "leaf")


@dataclass
class Node:
    kind: str
    children: list["Tree"] = field(default_factory=list)
    probs: list[float] | None = None
    value: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.children, (list, tuple)):
            raise TypeError(f"a node's children must be a list, got {type(self.children).__name__}")
        if self.kind == "leaf":
            if self.children:
                raise ValueError("a leaf has no children")
            if math.isnan(self.value):
                raise ValueError("a leaf value must not be NaN")
            return
        if not self.children:
            raise ValueError(f"a {self.kind} node needs at least one child")
        if self.kind == "chance":
            n = len(self.children)
            probs = [1.0 / n] * n if self.probs is None else [float(p) for p in self.probs]
            if len(probs) != n:
                raise ValueError(f"a chance node with {n} children needs {n} probabilities, got {len(probs)}")
            if any(not p >= 0 for p in probs) or abs(sum(probs) - 1) > 1e-9:
                raise ValueError(f"chance probabilities must be >= 0 and sum to 1, got {probs}")
            self.probs = probs
        elif self.probs is not None:
            raise ValueError(f"only chance nodes have probabilities, not a {self.kind} node")

    @staticmethod
    def max(children: Sequence["Tree"]) -> "Node":
        return Node("max", list(children))

    @staticmethod
    def min(children: Sequence["Tree"]) -> "Node":
        return Node("min", list(children))

    @staticmethod
    def chance(children: Sequence["Tree"], probs: Sequence[float] | None = None) -> "Node":
        return Node("chance", list(children), None if probs is None else list(probs))

    @staticmethod
    def leaf(value: float) -> "Node":
        return Node("leaf", value=float(value))


Tree = Union[Node, float, int]


@dataclass
class SearchResult:
    """value of the root; action: index of the best child of a max/min root (None for a
    leaf or chance root); nodes: nodes visited (shows alpha-beta pruning)."""

    value: float
    action: int | None
    nodes: int


def _node(t: Tree) -> Node:
    if isinstance(t, Node):
        return t
    if isinstance(t, numbers.Real) and not isinstance(t, bool):  # numpy scalars too
        return Node.leaf(t)
    raise TypeError(f"a game tree node must be a Node or a number, got {type(t).__name__}")


def _expectation(probs: list[float], values: list[float]) -> float:
    """sum p v over the children with p > 0 (a child never reached adds nothing, even at
    +-inf); +inf and -inf both reachable have no expectation: an error, not NaN."""
    reached = [v for p, v in zip(probs, values) if p > 0]
    if math.inf in reached and -math.inf in reached:
        raise ValueError("a chance node can reach both +inf and -inf: its expectation is undefined")
    return sum(p * v for p, v in zip(probs, values) if p > 0)


def _best(kind: str, values: list[float]) -> tuple[float, int]:
    pick = max if kind == "max" else min
    best = pick(values)
    return best, values.index(best)


def expectimax(tree: Tree) -> SearchResult:
    """Value of max, min and chance nodes: max / min of the children, or their expectation."""
    count = [0]

    def value(t: Tree) -> float:
        n = _node(t)
        count[0] += 1
        if n.kind == "leaf":
            return n.value
        vals = [value(c) for c in n.children]
        if n.kind == "chance":
            return _expectation(n.probs, vals)
        return _best(n.kind, vals)[0]

    root = _node(tree)
    _check_tree(root, chance=True)
    count[0] += 1
    if root.kind in ("leaf", "chance"):
        count[0] -= 1
        return SearchResult(value(root), None, count[0])
    vals = [value(c) for c in root.children]
    best, action = _best(root.kind, vals)
    return SearchResult(best, action, count[0])


# value() recurses once per level (two frames in Python 3.11: the call and its comprehension);
# lecture trees are a few levels deep, and this keeps well inside the default recursion limit.
MAX_DEPTH = 200


def _check_tree(root: Node, chance: bool) -> None:
    """Every node as its constructor would check it (a node changed after it was built, too),
    no cycle, at most MAX_DEPTH levels, and chance nodes only where ``chance``. Iterative, so a
    deep or cyclic tree gets this error rather than RecursionError or an endless search."""
    on_path: set[int] = set()
    done: set[int] = set()
    stack = [(root, 0, False)]
    while stack:
        n, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(n))
            done.add(id(n))
            continue
        if id(n) in on_path:
            raise ValueError("the game tree has a cycle: a node is its own descendant")
        if id(n) in done:  # a subtree shared by several parents: checked once
            continue
        if depth > MAX_DEPTH:
            raise ValueError(f"the game tree is deeper than {MAX_DEPTH} levels: the search is plain "
                             "recursion, for lecture-size trees")
        n.__post_init__()
        if n.kind == "chance" and not chance:
            raise ValueError("minimax has no chance nodes; use expectimax")
        on_path.add(id(n))
        stack.append((n, depth, True))
        if n.kind != "leaf":
            stack.extend((_node(c), depth + 1, False) for c in n.children)


def minimax(tree: Tree, alpha_beta: bool = True) -> SearchResult:
    """Minimax over max and min nodes (chance nodes: use :func:`expectimax`), with alpha-beta
    pruning by default (same value and action, fewer nodes visited)."""
    count = [0]

    def value(t: Tree, alpha: float, beta: float) -> float:
        n = _node(t)
        count[0] += 1
        if n.kind == "leaf":
            return n.value
        if n.kind == "max":
            best = -math.inf
            for c in n.children:
                best = max(best, value(c, alpha, beta))
                if alpha_beta:
                    if best >= beta:
                        return best
                    alpha = max(alpha, best)
            return best
        best = math.inf
        for c in n.children:
            best = min(best, value(c, alpha, beta))
            if alpha_beta:
                if best <= alpha:
                    return best
                beta = min(beta, best)
        return best

    root = _node(tree)
    _check_tree(root, chance=False)  # everywhere, not only where the search goes (pruning skips some)
    if root.kind == "leaf":
        return SearchResult(root.value, None, 1)
    count[0] += 1
    alpha, beta = -math.inf, math.inf
    vals: list[float] = []
    for c in root.children:
        v = value(c, alpha, beta)
        vals.append(v)
        if alpha_beta:
            if root.kind == "max":
                alpha = max(alpha, v)
            else:
                beta = min(beta, v)
    best, action = _best(root.kind, vals)
    return SearchResult(best, action, count[0])
