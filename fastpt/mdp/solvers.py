"""Dynamic-programming solvers for :class:`~fastpt.mdp.MDP`, all on the fused Bellman-sweep
kernel (``torch.ops.fastpt.value_iteration_{sparse,dense}``).

Stopping rules (Puterman, Markov Decision Processes, 6.3 and 6.6):

- ``sup``: stop when ||V_{k+1} - V_k||_inf < eps (1 - gamma) / (2 gamma); then the policy
  greedy with respect to V_{k+1} is eps-optimal and ||V_{k+1} - V*|| < eps / 2.
- ``span``: stop when span(V_{k+1} - V_k) = max - min < eps (1 - gamma) / gamma, far earlier;
  the greedy policy is eps-optimal but V is off by a near-constant shift, which the value
  extrapolation V_{k+1} + gamma / (1 - gamma) * (max + min) / 2 of the last change removes.

With gamma = 1 (terminal states) both rules stop at a change below eps, without that bound.

Rounding: a sweep in V's dtype is off by some delta, and the sup rule's bound becomes
||V_{k+1} - V*|| <= (gamma d + delta) / (1 - gamma), d the last change. The sup rule therefore
stops at d < eps (1 - gamma) / (2 gamma) - delta / gamma, delta estimated as
``SWEEP_ROUNDING`` (8) eps_dtype max|V| (measured: at most 3.4 eps_dtype max|V|); in float64
that is a relative 3e-7 of the threshold at gamma 0.9, eps 1e-6, max|V| 10. Where it would
leave less than delta (a threshold below delta (1 + 1 / gamma), about 16 eps_dtype max|V|),
the plain threshold applies and a RuntimeWarning says the guarantees may not hold. The span
rule keeps its threshold and warns on the same condition.

The span rule and its extrapolation hold for a stochastic P. Terminal states have their rows
dropped, so they read the MDP in which those rows lead to an absorbing zero-reward state: its
value never changes, so a change of 0 joins the span (:func:`span_change`). Without that, a
first sweep that changes every value alike (as a terminal's reward can) stopped the rule at
once, with V off by up to gamma / (1 - gamma) times that change.

Gauss-Seidel sweeps (``gauss_seidel=True``) keep the ``sup`` rule's two guarantees. The proof
for Jacobi sweeps uses the sweep only through ||L V_{k+1} - V_{k+1}|| <= gamma ||V_{k+1} - V_k||
(L: the Bellman operator), and that holds for a Gauss-Seidel sweep too: state s was updated
from a vector that equals V_{k+1} or V_k in every component, so it differs from V_{k+1} by at
most ||V_{k+1} - V_k||, and L is a gamma-contraction. The ``span`` rule's extrapolation has
no such argument; it runs on Jacobi sweeps only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fastpt._checks import check_int
from fastpt.mdp.model import MDP
from fastpt.ops.value_iteration import check_finite

STOP_RULES = ("sup", "span")


@dataclass
class Result:
    """What a solver returns.

    v: (S,) values. policy: (S,) int64, greedy with respect to v. iterations: sweeps (value
    iteration, modified PI's improvement steps) or policy improvements (policy iteration).
    residual: the last stopping quantity (sup or span of the last change; policy changes for
    policy iteration). converged: the stopping rule was met within max_iter. history: the
    stopping quantity of every iteration. q: (S, A) Q-values of v when asked for.
    """

    v: Tensor
    policy: Tensor
    iterations: int
    residual: float
    converged: bool
    history: list[float] = field(default_factory=list, repr=False)
    q: Tensor | None = field(default=None, repr=False)


@dataclass
class FiniteHorizonResult:
    """Backward induction: v[t] is the optimal value with horizon - t steps to go (v[horizon] =
    terminal values), policy[t] the optimal action at step t."""

    v: Tensor
    policy: Tensor


def sweep(mdp: MDP, v: Tensor, *, sweeps: int = 1, tol: float = 0.0, span: bool = False,
          gauss_seidel: bool = False, return_q: bool = False, gamma: float | None = None):
    """``sweeps`` Bellman sweeps of ``mdp`` from ``v`` (the kernel call every solver makes).
    Returns (v, policy, dv (sweeps, 2) min/max of the change, q)."""
    g = mdp.gamma if gamma is None else gamma
    if mdp.is_sparse:
        return torch.ops.fastpt.value_iteration_sparse(
            mdp.indptr, mdp.indices, mdp.values, mdp.reward, v, g, sweeps, gauss_seidel, return_q,
            tol, span, 0)
    return torch.ops.fastpt.value_iteration_dense(mdp.p, mdp.reward, v, g, sweeps, gauss_seidel,
                                                  return_q, tol, span, 0)


def span_change(dv: Tensor, mdp: MDP) -> Tensor:
    """dv ((sweeps, 2): min and max of each sweep's change) as the span rule reads it: with the
    absorbing zero-reward state of an MDP with terminal states, whose change is 0 (module
    docstring). NaN rows (sweeps not run) stay NaN."""
    if not bool(mdp.terminal.any()):
        return dv
    return torch.stack([dv[:, 0].clamp(max=0), dv[:, 1].clamp(min=0)], 1)


def residuals(dv: Tensor, span: bool) -> list[float]:
    """Stopping quantity per sweep run (rows of dv that are not NaN); ValueError once a sweep
    overflowed (the kernel reports a non-finite change as an infinite one)."""
    dv = dv[~torch.isnan(dv[:, 0])]
    r = (dv[:, 1] - dv[:, 0] if span else torch.maximum(-dv[:, 0], dv[:, 1])) + 0.0  # -0.0 -> 0.0
    check_no_overflow(r.tolist())
    return r.tolist()


def check_no_overflow(residuals: list[float]) -> None:
    """With finite rewards and V, a sweep's change is finite unless V overflowed its dtype:
    stop with the reason instead of sweeping on (or reporting convergence) with inf / NaN."""
    if not all(math.isfinite(r) for r in residuals):
        raise _overflowed("a sweep changed V by a non-finite amount")


def check_extrapolated(v: Tensor) -> None:
    """The span rule's extrapolated V, which may pass the dtype's range where V did not."""
    if not bool(torch.isfinite(v).all()):
        raise _overflowed("the span rule's extrapolation of V went past the dtype's range")


def _overflowed(what: str) -> ValueError:
    return ValueError(f"the values overflowed: {what}, so V is no longer finite (|R| / (1 - gamma) "
                      "exceeds the dtype's range?); scale the rewards down or use float64")


def _check_epsilon(epsilon) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number)):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__} {epsilon!r}")
    if not (epsilon > 0 and math.isfinite(epsilon)):  # inf would stop after one sweep
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")


def stop_threshold(epsilon: float, gamma: float, stop: str) -> float:
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    _check_epsilon(epsilon)
    if gamma == 1.0:
        return epsilon
    return epsilon * (1 - gamma) / (2 * gamma if stop == "sup" else gamma)


def _initial_values(mdp: MDP, v0, name: str = "v0") -> Tensor:
    if v0 is None:
        return torch.zeros(mdp.num_states, dtype=mdp.dtype)
    if torch.as_tensor(v0).is_complex():  # the cast would drop the imaginary part with a warning
        raise TypeError(f"{name} must be real, got a complex {type(v0).__name__}")
    v0 = torch.as_tensor(v0, dtype=mdp.dtype).contiguous().clone()  # a copy: solvers may write it
    if v0.shape != (mdp.num_states,):
        raise ValueError(f"{name} must have shape ({mdp.num_states},), got {tuple(v0.shape)}")
    check_finite(name, v0)
    return v0


def check_mdp(mdp) -> None:
    """Every solver's first check: an array or a Gridworld has no .gamma / .reward to read."""
    if not isinstance(mdp, MDP):
        hint = " (a Gridworld's MDP is its .mdp)" if isinstance(getattr(mdp, "mdp", None), MDP) else ""
        raise TypeError(f"mdp must be a fastpt.mdp.MDP, got {type(mdp).__name__}{hint}")


def _check_max_iter(max_iter: int) -> None:
    check_int("max_iter", max_iter)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


# One sweep's rounding of V, in units of eps_dtype * max|V|: it rounds gamma, the sum of P V
# and R + gamma P V (|R| <= 2 max|V| at the best action). Measured <= 3.4 in float32 on random
# MDPs (rows of 2 to 2000 successors); 8 leaves a margin.
SWEEP_ROUNDING = 8


def sweep_rounding(v: Tensor) -> float:
    """Estimated rounding error of one sweep at V (the kernel computes in V's dtype)."""
    return SWEEP_ROUNDING * torch.finfo(v.dtype).eps * float(v.abs().max()) if v.numel() else 0.0


def rounded_threshold(v: Tensor, threshold: float, gamma: float) -> float:
    """The ``sup`` rule's threshold less the rounding. A sweep that rounds by delta only gives
    ||V_{k+1} - V*|| <= (gamma d + delta) / (1 - gamma), d the last change: that stays under
    epsilon / 2 when d < threshold - delta / gamma. Where that would ask for a change below
    delta (one the rounding can keep from coming), the plain threshold, and a warning after
    (:func:`warn_below_resolution`). gamma = 1 has no such bound to keep: the plain one."""
    delta = sweep_rounding(v)
    if gamma == 1.0 or threshold - delta / gamma < delta:
        return threshold
    return threshold - delta / gamma


def warn_below_resolution(v: Tensor, threshold: float, gamma: float, stacklevel: int = 3) -> None:
    """A threshold within the rounding of a sweep is met by rounding (the iterates stop
    changing), not by convergence: the sup rule's epsilon guarantees do not follow."""
    delta = sweep_rounding(v)
    if gamma == 1.0:  # no bound to keep; warn only where the iterates cannot move that little
        delta /= SWEEP_ROUNDING
        low = threshold < delta
    else:
        low = threshold - delta / gamma < delta
    if low:
        warnings.warn(f"the stopping threshold {threshold:.3g} is within the {v.dtype} rounding of a "
                      f"sweep ({delta:.3g}, from max|V| = {float(v.abs().max()):.3g}): the sweeps may "
                      "have stopped changing by rounding, and V and the policy may be further than "
                      "epsilon from optimal; use float64 or a larger epsilon", RuntimeWarning,
                      stacklevel=stacklevel)


def value_iteration(mdp: MDP, epsilon: float = 1e-6, max_iter: int = 100_000, stop: str = "sup",
                    *, v0=None, gauss_seidel: bool = False, sweeps_per_call: int = 64,
                    return_q: bool = False) -> Result:
    """Value iteration to an epsilon-optimal policy (stopping rules: module docstring).

    Runs up to ``sweeps_per_call`` sweeps per kernel call; the kernel itself stops after the
    sweep that meets the rule, so no sweep is wasted. ``gauss_seidel`` (CPU, ``stop="sup"``):
    each sweep runs the states in 16 phases of consecutive states, a state reading the new
    values of earlier phases; on a random sparse MDP at gamma 0.9 it needs ~0.57x the sweeps
    of Jacobi, and the same bits whatever the thread count. The returned policy is greedy
    with respect to the returned v (one more sweep, not counted in ``iterations``).

    Raises:
        TypeError: mdp is not an :class:`MDP`; a bad argument type.
        ValueError: a bad argument value, or values that overflow the dtype.

    Warns:
        RuntimeWarning: the threshold is within a sweep's rounding (module docstring).
    """
    check_mdp(mdp)
    threshold = stop_threshold(epsilon, mdp.gamma, stop)
    _check_max_iter(max_iter)
    check_int("sweeps_per_call", sweeps_per_call)
    if sweeps_per_call < 1:
        raise ValueError(f"sweeps_per_call must be >= 1, got {sweeps_per_call}")
    if gauss_seidel and stop == "span":
        raise ValueError("stop='span' needs Jacobi sweeps (its value extrapolation assumes them); "
                         "use gauss_seidel=False or stop='sup'")
    span = stop == "span"
    v, history, converged = _initial_values(mdp, v0), [], False
    dv_last = None
    while len(history) < max_iter and not converged:
        k = min(sweeps_per_call, max_iter - len(history))
        # The sup rule's threshold shrinks as max|V| grows: a call may stop early (the loop
        # then goes on), never late. With terminal states the kernel's own span (without the
        # absorbing state's 0) may likewise stop a call early: it is at most the span read here.
        tol = threshold if span else rounded_threshold(v, threshold, mdp.gamma)
        v, _, dv, _ = sweep(mdp, v, sweeps=k, tol=tol, span=span, gauss_seidel=gauss_seidel)
        if span:
            dv = span_change(dv, mdp)
        res = residuals(dv, span)
        history += res
        dv_last = dv[len(res) - 1]
        converged = res[-1] < (threshold if span else rounded_threshold(v, threshold, mdp.gamma))
    if converged:
        warn_below_resolution(v, threshold, mdp.gamma)
    if span and converged and mdp.gamma < 1:
        v = v + mdp.gamma / (1 - mdp.gamma) * float(dv_last[0] + dv_last[1]) / 2
        check_extrapolated(v)
    _, policy, _, q = sweep(mdp, v, return_q=return_q)
    return Result(v, policy, len(history), history[-1], converged, history,
                  q if return_q else None)


def policy_evaluation(mdp: MDP, policy, *, method: str = "auto", epsilon: float = 1e-10,
                      max_iter: int = 1_000_000, v0=None) -> Result:
    """V of a deterministic policy: solves V = R_pi + gamma P_pi V.

    method: ``"direct"`` (dense MDPs: a linear solve in float64), ``"iterative"`` (sweeps of the
    policy's chain until ||V_{k+1} - V_k|| < epsilon (1 - gamma) / gamma, so ||V - V_pi|| <
    epsilon), or ``"auto"`` (direct for dense, iterative for sparse: a sparse MDP is never
    densified).
    """
    check_mdp(mdp)
    if method not in ("auto", "direct", "iterative"):
        raise ValueError(f"method must be 'auto', 'direct' or 'iterative', got {method!r}")
    _check_epsilon(epsilon)
    policy = mdp.check_policy(policy)
    chain = mdp.restricted(policy)
    if method == "auto":
        method = "iterative" if mdp.is_sparse else "direct"
    if method == "direct":
        if mdp.is_sparse:
            raise ValueError("direct policy evaluation needs a dense MDP; use method='iterative'")
        S = mdp.num_states
        a = torch.eye(S, dtype=torch.float64) - mdp.gamma * chain.p[0].to(torch.float64)
        try:
            v = torch.linalg.solve(a, chain.reward[:, 0].to(torch.float64))
            singular = not bool(torch.isfinite(v).all()) or float(torch.linalg.matrix_rank(a)) < S
        except torch.linalg.LinAlgError:
            singular = True
        if singular:
            raise ValueError("I - gamma P_pi is singular: the policy never reaches a terminal state "
                             "from some state, so the linear system does not determine its values "
                             "(infinite, or any constant on a loop of zero rewards); "
                             "method='iterative' evaluates the zero-reward case")
        return Result(v.to(mdp.dtype), policy, 1, 0.0, True, [0.0])
    _check_max_iter(max_iter)
    threshold = epsilon * (1 - mdp.gamma) / mdp.gamma if mdp.gamma < 1 else epsilon
    v, history = _initial_values(mdp, v0), []
    while len(history) < max_iter:
        v, _, dv, _ = sweep(chain, v, sweeps=min(64, max_iter - len(history)), tol=threshold)
        history += residuals(dv, False)
        if history[-1] < threshold:
            return Result(v, policy, len(history), history[-1], True, history)
    return Result(v, policy, len(history), history[-1], False, history)


def _improve(mdp: MDP, v: Tensor, policy: Tensor) -> Tensor:
    """Greedy policy for v, keeping the current action where it is (within rounding) as good,
    so policy iteration cannot cycle between equally good actions."""
    _, greedy, _, q = sweep(mdp, v, return_q=True)
    cur = q.gather(1, policy.view(-1, 1))[:, 0]
    best = q.gather(1, greedy.view(-1, 1))[:, 0]
    tie = 8 * torch.finfo(mdp.dtype).eps * (best.abs() + 1)
    return torch.where(cur >= best - tie, policy, greedy)


def policy_iteration(mdp: MDP, policy0=None, *, max_iter: int = 1000, method: str = "auto",
                     epsilon: float = 1e-10) -> Result:
    """Howard's policy iteration: evaluate (``policy_evaluation`` with ``method``/``epsilon``),
    improve greedily, until the policy is stable. The initial policy, unless given, is greedy
    for V = 0, or with gamma = 1 ``mdp.proper_policy()`` (one that reaches a terminal state,
    so its values are finite). With gamma = 1 the result is optimal under the stochastic
    shortest path assumption that a policy which never terminates has value -inf somewhere.
    history: number of states whose action changed, per improvement."""
    check_mdp(mdp)
    _check_max_iter(max_iter)
    _check_epsilon(epsilon)
    if policy0 is not None:
        policy = mdp.check_policy(policy0)
    elif mdp.gamma == 1.0:
        policy = mdp.proper_policy()
    else:
        policy = sweep(mdp, torch.zeros(mdp.num_states, dtype=mdp.dtype))[1]
    history, v = [], None
    for _ in range(max_iter):
        ev = policy_evaluation(mdp, policy, method=method, epsilon=epsilon, v0=v)
        if not ev.converged:
            raise ValueError("policy evaluation did not converge: the policy may never reach a "
                             "terminal state (gamma = 1)")
        v = ev.v
        new = _improve(mdp, v, policy)
        changed = int((new != policy).sum())
        history.append(float(changed))
        policy = new
        if changed == 0:
            return Result(v, policy, len(history), 0.0, True, history)
    return Result(v, policy, len(history), history[-1], False, history)


def modified_policy_iteration(mdp: MDP, epsilon: float = 1e-6, *, m: int = 10,
                              max_iter: int = 100_000, v0=None) -> Result:
    """Modified policy iteration (Puterman 6.5): a greedy sweep, then ``m`` sweeps of the
    greedy policy's chain (partial evaluation), until the greedy sweep changes V by less than
    epsilon (1 - gamma) / (2 gamma) (the sup rule). iterations: greedy sweeps."""
    check_mdp(mdp)
    check_int("m", m)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    threshold = stop_threshold(epsilon, mdp.gamma, "sup")
    _check_max_iter(max_iter)
    v, history = _initial_values(mdp, v0), []
    converged = False
    while len(history) < max_iter:
        v, policy, dv, _ = sweep(mdp, v)
        history += residuals(dv, False)
        if history[-1] < rounded_threshold(v, threshold, mdp.gamma):
            converged = True
            warn_below_resolution(v, threshold, mdp.gamma)
            break
        if m:
            v = sweep(mdp.restricted(policy), v, sweeps=m)[0]
    _, policy, _, _ = sweep(mdp, v)
    return Result(v, policy, len(history), history[-1], converged, history)


def backward_induction(mdp: MDP, horizon: int, terminal_values=None, *,
                       gamma: float | None = None) -> FiniteHorizonResult:
    """Finite-horizon optimal values and the (time-dependent) optimal policy.

    v[horizon] = terminal_values (default 0), v[t] = max_a R + gamma P v[t+1]. ``gamma``
    overrides the MDP's (1 is fine here, terminal states or not).
    """
    check_mdp(mdp)
    check_int("horizon", horizon)
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    g = mdp.gamma if gamma is None else MDP._check_gamma(gamma)
    v = torch.empty(horizon + 1, mdp.num_states, dtype=mdp.dtype)
    v[horizon] = _initial_values(mdp, terminal_values, "terminal_values")
    policy = torch.empty(horizon, mdp.num_states, dtype=torch.int64)
    for t in range(horizon - 1, -1, -1):
        v[t], policy[t], dv, _ = sweep(mdp, v[t + 1], gamma=g)
        residuals(dv, False)  # refuses an overflowed step
    return FiniteHorizonResult(v, policy)
