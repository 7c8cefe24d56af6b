"""Section "kernels": fastpt's fused ops against eager PyTorch (the references of
fastpt.ops.reference) and torch.compile of the same eager code, on small fp32 shapes, with
the harness of ``fastpt bench`` (timed in this process, alternating round by round)."""

from __future__ import annotations

from fastpt.demo import plots
from fastpt.demo.report import row_printer

HEADERS = ["op", "mode", "shape", "fastpt ms", "eager ms", "compile ms", "x eager", "x compile"]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(records) -> list[str]:
    by = {r.impl: r for r in records}
    f, compiled = by["fastpt"], by.get("compile")
    return [f.op, f.mode, f.shape, _fmt(f.median_ms, ".3f"), _fmt(by["eager"].median_ms, ".3f"),
            _fmt(compiled and compiled.median_ms, ".3f"), _fmt(f.ratio_vs_eager, ".2f"),
            _fmt(f.ratio_vs_compile, ".2f")]


def run(ctx, sec) -> None:
    from fastpt.benchmarks import harness
    from fastpt.benchmarks.run import load_spec
    cfg = ctx.config
    timing = harness.Timing(budget_s=cfg.kernel_budget_s)
    cases = []
    show = row_printer(HEADERS, [16, 6, 30, 9, 9, 10, 7, 9])
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
        f"fp32, {cfg.threads} threads, median of alternating rounds ({cfg.kernel_budget_s:g} s "
        "per case). `x eager` / `x compile` = baseline time / fastpt time (> 1: fastpt is "
        "faster). Full suite: `fastpt bench`."))
    fastpt_records = [next(r for r in c if r.impl == "fastpt") for c in cases]
    ratios = {"eager": [r.ratio_vs_eager for r in fastpt_records]}
    if cfg.kernel_compile:
        ratios["torch.compile"] = [r.ratio_vs_compile for r in fastpt_records]
    labels = [f"{r.op} {r.mode}" for r in fastpt_records]
    plots.speedup_bars(ctx.path("kernels.png"), labels, ratios)
    sec.image("kernels.png", "fastpt speed-up over eager PyTorch and torch.compile")
