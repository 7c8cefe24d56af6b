"""Markov decision processes on fastpt's fused value-iteration kernel.

- :class:`MDP`: dense or sparse transitions, rewards R(s,a) or R(s,a,s'), discount, terminal
  states; validated once in O(nnz).
- Solvers: :func:`value_iteration` (sup or span stopping rule), :func:`policy_evaluation`,
  :func:`policy_iteration`, :func:`modified_policy_iteration`, :func:`backward_induction`,
  and :func:`distributed_value_iteration` over ``torch.distributed`` ranks.
- Game trees: :func:`expectimax`, :func:`minimax` on :class:`Node` trees.
- Examples: :func:`gridworld_4x3` (Russell & Norvig), :func:`random_sparse_mdp`.
"""

from fastpt.mdp.distributed import distributed_value_iteration
from fastpt.mdp.examples import Gridworld, check_random_mdp_fits, gridworld_4x3, random_sparse_mdp
from fastpt.mdp.games import Node, SearchResult, expectimax, minimax
from fastpt.mdp.model import MDP
from fastpt.mdp.solvers import (FiniteHorizonResult, Result, backward_induction,
                                modified_policy_iteration, policy_evaluation, policy_iteration,
                                value_iteration)

__all__ = ["MDP", "Result", "FiniteHorizonResult", "value_iteration", "policy_evaluation",
           "policy_iteration", "modified_policy_iteration", "backward_induction",
           "distributed_value_iteration", "Node", "SearchResult", "expectimax", "minimax",
           "Gridworld", "check_random_mdp_fits", "gridworld_4x3", "random_sparse_mdp"]
