"""Timing rounds and command-line checks shared by the model-level benchmarks (models,
dropin, finetune, trainer)."""

from __future__ import annotations

import argparse
import gc
import os
import time

from fastpt.benchmarks.harness import check_rounds


def alternate_rounds(calls: dict, budget_s: float, min_rounds: int, max_rounds: int) -> dict[str, list[tuple]]:
    """(wall, process CPU) seconds per call, one call of each impl per round, order rotating,
    for at least min_rounds and at most max_rounds, until budget_s has passed."""
    check_rounds(budget_s, min_rounds, max_rounds)
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


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated option's items, stripped, duplicates dropped (each runs once); an
    empty item stays, so that :func:`check_subsets` refuses it."""
    return tuple(dict.fromkeys(s.strip() for s in text.split(",")))


def check_subsets(parser: argparse.ArgumentParser, **options: tuple[tuple, tuple]) -> None:
    """options: name=(values, allowed); a parser error unless each is a non-empty subset."""
    for name, (values, allowed) in options.items():
        if not values or any(v not in allowed for v in values):
            parser.error(f"--{name} must be a comma-separated subset of {','.join(allowed)}, "
                         f"got {','.join(values)!r}")


def add_threads_and_budget(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """``--budget SECONDS`` (a finite number >= 0; default None: the script's own) and
    ``--threads N`` (an integer >= 1), with ``fastpt bench``'s checks."""
    from fastpt.cli import positive_int_arg, seconds_arg
    parser.add_argument("--budget", type=seconds_arg, default=None, metavar="SECONDS",
                        help="seconds of timed rounds per case (a finite number >= 0)")
    parser.add_argument("--threads", type=positive_int_arg, default=threads, metavar="N",
                        help=f"torch threads (default: {threads})")


def check_output_paths(**paths: str | None) -> None:
    """Raises ConfigError, before any timing, unless each given path (option name -> path, or
    None when not given) is a file name in an existing, writable folder, and no two name the
    same file (the second write would replace the first's results). A missing folder would
    only fail at the end, with the results lost; an empty path would write nothing."""
    from fastpt.commands.common import check_output_file
    from fastpt.commands.options import ConfigError
    seen: dict[str, str] = {}
    for key, path in paths.items():
        if path is None:
            continue
        if not path.strip():
            raise ConfigError(f"{key}: expected a file path, got {path!r}")
        check_output_file(path, key)
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{seen[real]} and {key} name the same file ({path}): the second "
                              "write would replace the first")
        seen[real] = key


def check_json_path(parser: argparse.ArgumentParser, path: str | None) -> None:
    """A parser error, before any timing, unless ``path`` (--json) can be written
    (:func:`check_output_paths`)."""
    from fastpt.commands.options import ConfigError
    try:
        check_output_paths(**{"--json": path})
    except ConfigError as e:
        parser.error(str(e))
