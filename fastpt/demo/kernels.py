"""Section "kernels": fastpt's fused ops against eager PyTorch (the references of
fastpt.ops.reference) and torch.compile of the same eager code, on small fp32 shapes, with
the harness of ``fastpt bench`` (timed in this process, alternating round by round); fp64
for the value-iteration ops, which have no fp32 case.

The rows are the harness's (:func:`harness.case_row`): an impl whose outputs disagreed with
eager before timing has ``FAIL`` in its ratio cells, the section lists the disagreements
under the table, and the plot leaves out its bars (its label says FAIL)."""

from __future__ import annotations

from fastpt.demo import plots
from fastpt.demo.report import row_printer

HEADERS = ["op", "dtype", "mode", "shape", "fastpt ms", "eager ms", "compile ms", "x eager", "x compile"]


def _row(records) -> list[str]:
    """The ``HEADERS`` cells of ``fastpt bench``'s row for this case (``FAIL`` included)."""
    from fastpt.benchmarks import harness
    row = harness.case_row(records)
    return [row[harness.COLUMNS.index(h)] for h in HEADERS]


def _plotted(row: list[str], header: str) -> float | None:
    """A ratio cell as a bar height: None (no bar) when it is no number (``-``, ``FAIL``)."""
    cell = row[HEADERS.index(header)]
    try:
        return float(cell)
    except ValueError:
        return None


def run(ctx, sec) -> None:
    from fastpt.benchmarks import harness
    from fastpt.benchmarks.run import load_spec
    cfg = ctx.config
    timing = harness.Timing(budget_s=cfg.kernel_budget_s)
    cases = []
    show = row_printer(HEADERS, [16, 5, 6, 30, 9, 9, 10, 7, 9])
    for op in cfg.kernel_ops:
        spec = load_spec(op)
        shapes = harness.shape_cases(spec.shapes["quick"])[0]   # the small shapes of the suite
        dtype = "fp32" if "fp32" in spec.dtypes else spec.dtypes[0]
        for mode in (m for m in cfg.kernel_modes if m in spec.modes):
            records = harness.measure_case(spec, shapes, dtype, mode, compile=cfg.kernel_compile,
                                           timing=timing, threads=cfg.threads)
            cases.append(records)
            show(_row(records))
    if not cases:
        raise ValueError("no benchmark case: none of kernel_ops runs in kernel_modes")
    rows = [_row(c) for c in cases]
    sec.table(HEADERS, rows, echo=False, caption=(
        f"{cfg.threads} threads, median of alternating rounds ({cfg.kernel_budget_s:g} s "
        "per case). `x eager` / `x compile` = baseline time / fastpt time (> 1: fastpt is "
        "faster). Full suite: `fastpt bench`."))
    failed = harness.disagreements(r for c in cases for r in c)
    if failed:
        sec.text(f"**{harness.FAIL}**: the outputs differ from eager beyond the op's tolerance "
                 "(checked before timing):\n\n" + "\n".join(f"- {line}" for line in failed))
    ratios = {"eager": [_plotted(row, "x eager") for row in rows]}
    if cfg.kernel_compile:
        ratios["torch.compile"] = [_plotted(row, "x compile") for row in rows]
    labels = [f"{row[0]} {row[2]}" + (f" {harness.FAIL}" if harness.FAIL in row else "")
              for row in rows]
    plots.speedup_bars(ctx.path("kernels.png"), labels, ratios)
    sec.image("kernels.png", "fastpt speed-up over eager PyTorch and torch.compile")
