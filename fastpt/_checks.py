"""Argument checks shared across fastpt's packages (objectives, recipes, MDP solvers)."""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An int argument (a length, a size, a seed): TypeError for a bool, which passed as 0 or 1,
    or a float, which int() or torch cut silently or refused with a message naming neither the
    argument nor the value; ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> None:
    # A string such as "no" is truthy: it switched the option on.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")

