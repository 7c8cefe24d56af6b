"""Timing rounds and command-line checks shared by the model-level benchmarks (models,
dropin, finetune, trainer)."""

from __future__ import annotations

import argparse
import gc
import time


def alternate_rounds(calls: dict, budget_s: float, min_rounds: int, max_rounds: int) -> dict[str, list[tuple]]:
    """(wall, process CPU) seconds per call, one call of each impl per round, order rotating,
    for at least min_rounds and at most max_rounds, until budget_s has passed."""
    samples = {n: [] for n in calls}
    gc.collect()
    deadline = time.perf_counter() + budget_s
    names, r = list(calls), 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() < deadline):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            samples[name].append((time.perf_counter() - t0, time.process_time() - c0))
        r += 1
    return samples


def check_subsets(parser: argparse.ArgumentParser, **options: tuple[tuple, tuple]) -> None:
    """options: name=(values, allowed); a parser error unless each is a non-empty subset."""
    for name, (values, allowed) in options.items():
        if not values or any(v not in allowed for v in values):
            parser.error(f"--{name} must be a comma-separated subset of {','.join(allowed)}")


def check_json_path(parser: argparse.ArgumentParser, path: str | None) -> None:
    """A parser error, before any timing, unless ``path`` (--json) can be written: a missing
    folder would only fail at the end, with the results lost."""
    from fastpt.commands.common import check_output_file
    from fastpt.commands.options import ConfigError
    if path is not None:
        try:
            check_output_file(path, "--json")
        except ConfigError as e:
            parser.error(str(e))
