"""The shared benchmark harness: one op benchmark = one declarative :class:`OpSpec`.

For each case (op, dtype, mode) it times, in the same process and alternating round by
round (so drift of the shared host hits every implementation alike):

- ``fastpt``: the fused op; ``eager``: the pure-PyTorch reference of fastpt.ops.reference
  in the bench dtype; ``compile``: ``torch.compile(eager, fullgraph=True)``; plus any named
  baselines of the spec (e.g. ``sdpa``);
- ``copy``: ``dst.copy_(src)`` into an existing buffer moving as many bytes as the case's
  minimal traffic, the machine's copy bandwidth in the same run (reported as GB/s).

Modes: ``fwd`` calls the op; ``fwdbwd`` calls it on inputs that require grad, then
``torch.autograd.grad`` with fixed grad outputs for every differentiable input. Each call
includes allocating and freeing its outputs, as in a training step.

Peak memory (specs with ``peak_memory=True``): the most memory torch's CPU allocator holds
at once during one call beyond what existed before it (outputs, saved tensors and
temporaries included), from the profiler's allocation records (:func:`peak_memory_bytes`).

% of copy bandwidth = (minimal bytes / median time) / copy GB/s. Minimal bytes: the
forward reads each tensor input once and writes each output once; the backward reads
each grad output and the inputs it needs again (``Inputs.bwd_reads``) once and writes
each gradient once. fwd and bwd run as separate kernels in training, so that is the
least any implementation moves.
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from fastpt.alloc import peak_memory_bytes  # noqa: F401  (part of the harness API)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "fwdbwd")
# Loose agreement check of fastpt against eager before timing (tests hold the real bar).
_AGREE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float64: 1e-9}


@dataclass(frozen=True)
class Inputs:
    """Arguments for one case. ``args`` are positional (tensors and plain values);
    ``grad``: indices of the args that get gradients in fwdbwd; ``bwd_reads``: indices of
    the args the backward needs to read again (counted in the minimal bytes)."""

    args: tuple
    grad: tuple[int, ...] = ()
    bwd_reads: tuple[int, ...] = ()


@dataclass(frozen=True)
class OpSpec:
    """What the harness needs to benchmark one op.

    ``shapes`` maps a size ("full", "quick") to named input shapes; ``make_inputs(shapes,
    dtype, requires_grad)`` builds the :class:`Inputs`; ``fastpt`` and ``eager`` take
    ``*Inputs.args`` and return a tensor or a tuple of tensors. ``nbytes(inputs, outputs,
    mode)`` overrides the default byte count (:func:`minimal_bytes`). ``compile=False``: no
    torch.compile impl (ops whose eager path is not torch code, e.g. scipy).
    """

    name: str
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
    make_inputs: Callable[[Mapping[str, tuple[int, ...]], torch.dtype, bool], Inputs]
    fastpt: Callable
    eager: Callable
    baselines: Mapping[str, Callable] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    modes: tuple[str, ...] = MODES
    nbytes: Callable | None = None
    compile: bool = True
    peak_memory: bool = False          # also record each impl's peak memory per call
    flops: Callable | None = None      # compute-bound ops: FLOPs of one call -> a GFLOP/s column
    agree_tol: float | None = None     # relative fastpt-vs-eager tolerance (e.g. int8 vs float)


@dataclass
class Record:
    """One (op, dtype, mode, alloc, impl) result. Ratios are baseline time / this impl's
    time, filled on fastpt records only (> 1: fastpt is faster)."""

    op: str
    dtype: str
    mode: str
    shape: str
    impl: str
    median_ms: float
    ratio_vs_eager: float | None
    ratio_vs_compile: float | None
    pct_copy_bandwidth: float
    alloc: str
    bytes: int = 0           # minimal bytes of the case
    copy_gbps: float = 0.0   # copy bandwidth measured in the same rounds
    threads: int = 0
    rounds: int = 0          # timed calls per implementation
    first_call_s: float = 0.0  # first call (for compile: compilation time)
    peak_mib: float | None = None  # peak memory of one call (specs with peak_memory)
    gflops: float | None = None    # FLOP rate (specs with flops)


@dataclass(frozen=True)
class Timing:
    """How long to measure: ``budget_s`` of alternating rounds per case, at least
    ``min_rounds`` and at most ``max_rounds``, after ``warmup`` untimed calls."""

    budget_s: float = 3.0
    min_rounds: int = 5
    max_rounds: int = 1000
    warmup: int = 2


def shape_str(shapes: Mapping[str, Sequence[int]]) -> str:
    return " ".join(f"{name}=" + "x".join(map(str, s)) for name, s in shapes.items())


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _nb(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def minimal_bytes(inputs: Inputs, outputs: Sequence[torch.Tensor], mode: str) -> int:
    """Forward: tensor inputs read once + outputs written once. fwdbwd adds the backward:
    grad outputs + ``bwd_reads`` inputs read once, one gradient per ``grad`` input written."""
    fwd = sum(map(_nb, inputs.args)) + sum(map(_nb, outputs))
    if mode == "fwd":
        return fwd
    bwd = (sum(map(_nb, outputs)) + sum(_nb(inputs.args[i]) for i in inputs.bwd_reads)
           + sum(_nb(inputs.args[i]) for i in inputs.grad))
    return fwd + bwd


def _bind(fn: Callable, inputs: Inputs, mode: str, grad_outputs: tuple) -> Callable[[], tuple]:
    args = inputs.args
    if mode == "fwd":
        return lambda: _tuple(fn(*args))
    wrt = [args[i] for i in inputs.grad]
    return lambda: torch.autograd.grad(_tuple(fn(*args)), wrt, grad_outputs)


# Copy buffers stop growing here: far past the caches, bandwidth no longer depends on size.
_COPY_MAX_BYTES = 256 << 20


def _copy_call(nbytes: int) -> tuple[Callable[[], None], int]:
    """A copy moving ``nbytes`` (half read, half written; at most 2 x 256 MiB) between two
    existing float32 buffers. Returns the call and the bytes it moves."""
    n = max(min(nbytes // 2, _COPY_MAX_BYTES) // 4, 1024)
    src, dst = torch.randn(n), torch.empty(n)
    return (lambda: dst.copy_(src)), 8 * n


def shape_cases(shapes) -> list:
    """``OpSpec.shapes[size]``: one mapping of named shapes, or a list of them (several cases)."""
    return list(shapes) if isinstance(shapes, (list, tuple)) else [shapes]


def _compile(fn: Callable) -> Callable:
    # NOTE: a fresh dynamo state per case: each case is a new shape/dtype/grad mode of the same
    # reference function, and the per-function recompile limit (8) would otherwise be reached.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _alternate(calls: Mapping[str, Callable], timing: Timing) -> dict[str, list[int]]:
    """Time one call of each impl per round, rotating the order, until the budget is spent."""
    names = list(calls)
    samples: dict[str, list[int]] = {n: [] for n in names}
    deadline = time.perf_counter_ns() + int(timing.budget_s * 1e9)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while r < timing.max_rounds and (r < timing.min_rounds or time.perf_counter_ns() < deadline):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                call = calls[name]
                t0 = time.perf_counter_ns()
                call()
                samples[name].append(time.perf_counter_ns() - t0)
            r += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _median_ms(ns: list[int]) -> float:
    s = sorted(ns)
    mid = len(s) // 2
    return (s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2) / 1e6


def _check_agreement(spec: OpSpec, dtype: torch.dtype, mode: str, got: tuple, ref: tuple) -> None:
    for g, r in zip(got, ref):
        g, r = g.detach(), r.detach()
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((g.float() - r.float()).abs().max()) if r.numel() else 0.0
        if not err <= (spec.agree_tol or _AGREE_TOL[dtype]) * max(scale, 1e-30):
            warnings.warn(f"{spec.name} {dtype} {mode}: fastpt differs from eager "
                          f"(max error {err:.3g}, max |eager| {scale:.3g}); timing it anyway",
                          stacklevel=2)


def measure_case(spec: OpSpec, shapes: Mapping[str, tuple[int, ...]], dtype: str, mode: str, *,
                 alloc: str = "default", compile: bool = True, timing: Timing = Timing(),
                 threads: int | None = None) -> list[Record]:
    """Time every implementation of one case; returns one Record per impl (fastpt first)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    inputs = spec.make_inputs(shapes, tdtype, mode == "fwdbwd")
    with torch.no_grad():
        outputs = _tuple(spec.eager(*inputs.args))
    grad_outputs = tuple(torch.randn_like(o) for o in outputs) if mode == "fwdbwd" else ()
    nbytes = (spec.nbytes or minimal_bytes)(inputs, outputs, mode)
    del outputs

    impls = {"fastpt": spec.fastpt, "eager": spec.eager}
    if compile and spec.compile:
        impls["compile"] = _compile(spec.eager)
    impls.update(spec.baselines)
    calls = {name: _bind(fn, inputs, mode, grad_outputs) for name, fn in impls.items()}
    calls["copy"], copy_bytes = _copy_call(nbytes)

    first_s, results = {}, {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        result = call()
        first_s[name] = time.perf_counter() - t0
        if name in ("fastpt", "eager"):
            results[name] = result
        for _ in range(timing.warmup - 1):
            call()
    _check_agreement(spec, tdtype, mode, results["fastpt"], results["eager"])
    del results
    peak = {name: peak_memory_bytes(call) / 2**20 for name, call in calls.items() if name != "copy"} \
        if spec.peak_memory else {}

    samples = _alternate(calls, timing)
    ms = {name: _median_ms(ns) for name, ns in samples.items()}
    flops = spec.flops(shapes, mode) if spec.flops else None
    copy_gbps = copy_bytes / (ms["copy"] * 1e6)
    records = []
    for name in impls:
        is_fastpt = name == "fastpt"
        records.append(Record(
            op=spec.name, dtype=dtype, mode=mode, shape=shape_str(shapes), impl=name,
            median_ms=ms[name],
            ratio_vs_eager=ms["eager"] / ms[name] if is_fastpt else None,
            ratio_vs_compile=ms["compile"] / ms[name] if is_fastpt and "compile" in ms else None,
            pct_copy_bandwidth=100.0 * nbytes / (ms[name] * 1e6) / copy_gbps,
            alloc=alloc, bytes=nbytes, copy_gbps=copy_gbps,
            threads=threads or torch.get_num_threads(), rounds=len(samples[name]),
            first_call_s=first_s[name], peak_mib=peak.get(name),
            gflops=flops / (ms[name] * 1e6) if flops else None))
    return records


# ---------------------------------------------------------------- reporting

COLUMNS = ("alloc", "op", "dtype", "mode", "shape", "fastpt ms", "eager ms", "compile ms",
           "x eager", "x compile", "fastpt %bw", "compile %bw", "copy GB/s", "fastpt MiB", "eager MiB",
           "fastpt GFLOP/s")
_WIDTHS = (7, 9, 5, 6, 31, 9, 9, 10, 7, 9, 10, 11, 9, 10, 9, 14)


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def case_row(records: Iterable[Record]) -> list[str]:
    """One table row per case from its records (any order)."""
    by = {r.impl: r for r in records}
    f, c = by["fastpt"], by.get("compile")
    return [f.alloc, f.op, f.dtype, f.mode, f.shape, _fmt(f.median_ms, ".3f"),
            _fmt(by["eager"].median_ms, ".3f"), _fmt(c and c.median_ms, ".3f"),
            _fmt(f.ratio_vs_eager, ".2f"), _fmt(f.ratio_vs_compile, ".2f"),
            _fmt(f.pct_copy_bandwidth, ".0f"), _fmt(c and c.pct_copy_bandwidth, ".0f"),
            _fmt(f.copy_gbps, ".1f"), _fmt(f.peak_mib, ".0f"), _fmt(by["eager"].peak_mib, ".0f"),
            _fmt(f.gflops, ".0f")]


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


def write_json(records: Sequence[Record], path: str) -> None:
    """A JSON list of record objects, one record per line."""
    lines = [json.dumps(asdict(r)) for r in records]
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")


def read_json(path: str) -> list[Record]:
    with open(path) as f:
        return [Record(**d) for d in json.load(f)]


def markdown_table(records: Sequence[Record]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    align = "|" + "|".join("---" if i <= 4 else "---:" for i in range(len(COLUMNS))) + "|"
    rows = ["| " + " | ".join(case_row(g)) + " |" for g in group_cases(records)]
    return "\n".join([head, align, *rows]) + "\n"


def write_markdown(records: Sequence[Record], path: str, preamble: str = "") -> None:
    with open(path, "w") as f:
        if preamble:
            f.write(preamble.rstrip() + "\n\n")
        f.write(markdown_table(records))
