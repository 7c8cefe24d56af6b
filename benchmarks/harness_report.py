"""Reporting the harness's records: text and markdown tables, the agreement failures, JSON files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Iterable, Sequence

from fastpt._atomic import atomic_write
from fastpt.benchmarks.harness_types import Record


COLUMNS = ("alloc", "op", "dtype", "mode", "shape", "fastpt ms", "eager ms", "compile ms",
           "x eager", "x compile", "fastpt %bw", "compile %bw", "copy GB/s", "fastpt MiB", "eager MiB",
           "fastpt GFLOP/s")
_WIDTHS = (7, 9, 5, 6, 31, 9, 9, 10, 7, 9, 10, 11, 9, 10, 9, 14)


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


FAIL = "FAIL"  # the ratio cells of an impl that failed the agreement check


def _failed(r: Record | None) -> bool:
    return r is not None and r.agrees is False


def fail_or(failed: bool, value, spec: str) -> str:
    """A ratio cell: ``FAIL`` where the impl (or the one it is compared with) disagreed with
    the reference before timing, else ``value`` formatted (``-`` for None or nan)."""
    return FAIL if failed else _fmt(value, spec)


def case_row(records: Iterable[Record]) -> list[str]:
    """One table row per case from its records (any order). The ratio cells (x eager,
    x compile, %bw, GFLOP/s) of an impl that disagreed with eager read ``FAIL``."""
    by = {r.impl: r for r in records}
    f, c = by["fastpt"], by.get("compile")
    f_bad, c_bad = _failed(f), _failed(c)
    return [f.alloc, f.op, f.dtype, f.mode, f.shape, _fmt(f.median_ms, ".3f"),
            _fmt(by["eager"].median_ms, ".3f"), _fmt(c and c.median_ms, ".3f"),
            fail_or(f_bad, f.ratio_vs_eager, ".2f"),
            fail_or(f_bad or c_bad, f.ratio_vs_compile, ".2f"),
            fail_or(f_bad, f.pct_copy_bandwidth, ".0f"),
            fail_or(c_bad, c and c.pct_copy_bandwidth, ".0f"),
            _fmt(f.copy_gbps, ".1f"), _fmt(f.peak_mib, ".0f"), _fmt(by["eager"].peak_mib, ".0f"),
            fail_or(f_bad and f.gflops is not None, f.gflops, ".0f")]


def disagreement_line(impl: str, reference: str, case: str, error: float | None) -> str:
    """The line that lists an impl that failed the agreement check in ``case``."""
    return (f"{impl} disagrees with {reference} in {case} (max relative error: {_fmt(error, '.3g')}); "
            "its ratios are not valid")


def disagreements(records: Iterable[Record]) -> list[str]:
    """One line per record that failed the agreement check (baselines included)."""
    return [disagreement_line(r.impl, "eager", f"{r.alloc} {r.op} {r.dtype} {r.mode} {r.shape}", r.max_rel_error)
            for r in records if r.agrees is False]


def failure_note(lines: Sequence[str], reference: str = "eager", tolerance: str = "the spec's tolerance") -> str:
    """The note under a table that lists the impls that failed the agreement check (``lines``,
    e.g. :func:`disagreements`); "" when there are none."""
    if not lines:
        return ""
    return (f"\n{FAIL}: the outputs differ from {reference} beyond {tolerance} (checked before timing):\n\n"
            + "".join(f"- {line}\n" for line in lines))


def text_header() -> str:
    return "  ".join(h.rjust(w) if i > 4 else h.ljust(w)
                     for i, (h, w) in enumerate(zip(COLUMNS, _WIDTHS)))


def text_row(records: Iterable[Record]) -> str:
    return "  ".join(v.rjust(w) if i > 4 else v.ljust(w)
                     for i, (v, w) in enumerate(zip(case_row(records), _WIDTHS)))


def group_cases(records: Iterable[Record]) -> list[list[Record]]:
    """Records grouped per case, in first-seen order."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.alloc, r.op, r.dtype, r.mode, r.shape), []).append(r)
    return list(groups.values())


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def write_json(records: Sequence[Record], path: str) -> None:
    """A JSON list of record objects, one record per line (written atomically). A record
    with ``"agrees": false`` failed the agreement check: its ratios are not valid."""
    lines = [json.dumps(asdict(r)) for r in records]
    _write_text(path, "[\n" + ",\n".join(lines) + "\n]\n")


def read_json(path: str) -> list[Record]:
    with open(path) as f:
        return [Record(**d) for d in json.load(f)]


def markdown_table(records: Sequence[Record]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join("---" if i <= 4 else "---:" for i in range(len(COLUMNS))) + "|"
    rows = ["| " + " | ".join(case_row(g)) + " |" for g in group_cases(records)]
    return "\n".join([head, align, *rows]) + "\n" + failure_note(disagreements(records))


def write_markdown(records: Sequence[Record], path: str, preamble: str = "") -> None:
    """The preamble and :func:`markdown_table` (written atomically)."""
    _write_text(path, (preamble.rstrip() + "\n\n" if preamble else "") + markdown_table(records))
