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
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from fastpt._atomic import atomic_write
from fastpt.alloc import peak_memory_bytes  # noqa: F401  (part of the harness API)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "fwdbwd")
# Default agreement tolerance of every impl against eager, relative to max |eager| (the
# tests hold the real bar for fastpt; this catches a wrong kernel before it can win a table).
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

    Agreement (checked before timing, for every impl but eager and those in ``raw``): each
    output (in fwdbwd the forward outputs and the gradients) must be within ``tol`` x
    max |eager| of eager's. ``tol`` is ``agree_tol`` (one float for every impl, or a mapping
    impl -> tolerance; impls it does not name get the dtype's default), never below the
    output dtype's rounding (2 x its machine epsilon). ``agree_also`` maps an impl to
    ``(other impl, tolerance)``: it must also agree with that impl's output (e.g. a kernel
    against the eager version of the same computation, with a tight tolerance). ``raw``:
    impls whose output differs from eager's by design (e.g. ``int_mm``: the int32 product
    before scaling); they are timed but not checked.
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
    agree_tol: float | Mapping[str, float] | None = None  # relative tolerance vs eager (see above)
    agree_also: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    raw: tuple[str, ...] = ()          # impls not checked against eager (output raw by design)


@dataclass
class Record:
    """One (op, dtype, mode, alloc, impl) result. Ratios are baseline time / this impl's
    time, filled on fastpt records only (> 1: fastpt is faster).

    ``agrees``: whether this impl's outputs matched the reference within the spec's tolerance
    before timing (None: eager itself, or an impl declared raw). A disagreeing impl is still
    timed, and its ratio cells print as ``FAIL``. ``max_rel_error``: its largest error against
    eager relative to max |eager| (None when not checked or when the shapes differ)."""

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
    agrees: bool | None = None     # outputs matched the reference before timing (see above)
    max_rel_error: float | None = None


@dataclass(frozen=True)
class Timing:
    """How long to measure: ``budget_s`` of alternating rounds per case, at least
    ``min_rounds`` and at most ``max_rounds``, after ``warmup`` untimed calls."""

    budget_s: float = 3.0
    min_rounds: int = 5
    max_rounds: int = 1000
    warmup: int = 2

    def __post_init__(self):
        check_rounds(self.budget_s, self.min_rounds, self.max_rounds)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"Timing.warmup must be an int >= 1 (the first call counts), got {self.warmup!r}")


def check_rounds(budget_s: float, min_rounds: int, max_rounds: int) -> None:
    """ValueError unless budget_s is a finite number >= 0 and 1 <= min_rounds <= max_rounds
    (ints): no round at all would leave an implementation without a time."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) \
            or not (budget_s >= 0 and math.isfinite(budget_s)):
        raise ValueError(f"budget_s must be a finite number of seconds >= 0, got {budget_s!r}")
    for name, value in (("min_rounds", min_rounds), ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_rounds < min_rounds:
        raise ValueError(f"max_rounds must be >= min_rounds, got max_rounds={max_rounds} < min_rounds={min_rounds}")


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


def _bind_checked(fn: Callable, inputs: Inputs, mode: str, grad_outputs: tuple) -> Callable[[], tuple]:
    """Like :func:`_bind`, but the call returns what the agreement check compares: the
    outputs (fwd), or the detached forward outputs followed by the gradients (fwdbwd)."""
    args = inputs.args
    if mode == "fwd":
        return lambda: _tuple(fn(*args))
    wrt = [args[i] for i in inputs.grad]

    def call():
        out = _tuple(fn(*args))
        grads = torch.autograd.grad(out, wrt, grad_outputs)
        return tuple(o.detach() for o in out) + tuple(grads)
    return call


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


def agree_tolerance(spec: OpSpec, impl: str, dtype: torch.dtype) -> float:
    """The relative tolerance of ``impl`` against eager (see :class:`OpSpec`)."""
    tol = spec.agree_tol
    if isinstance(tol, Mapping):
        tol = tol.get(impl)
    if tol is None:
        tol = _AGREE_TOL[dtype]
    return rounding_floor(tol, dtype)


def rounding_floor(tol: float, dtype: torch.dtype) -> float:
    """``tol``, raised to the rounding of ``dtype`` (2 x its machine epsilon) where it is lower."""
    # Two results rounded to the output dtype independently differ by up to one ulp (eps x |y|)
    # even when their exact values agree; 2 x eps leaves room for the rest (bf16: ~1.6e-2).
    return max(tol, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else tol


def max_rel_error(got: tuple, ref: tuple) -> float | None:
    """Largest |got - ref| over every output, each relative to its max |ref|; None when
    the outputs differ in number or shape, or the error is not finite (a nan or inf)."""
    if len(got) != len(ref):
        return None
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        if not (isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor)) or g.shape != r.shape:
            return None
        if not r.numel():
            continue
        g, r = g.detach().double(), r.detach().double()
        scale = max(float(r.abs().max()), 1e-30)
        err = float((g - r).abs().max()) / scale
        if not math.isfinite(err):
            return None
        worst = max(worst, err)
    return worst


def _agrees(err: float | None, tol: float) -> bool:
    return err is not None and err <= tol


def _check_agreement(spec: OpSpec, dtype: torch.dtype, mode: str, impl: str, got: tuple,
                     refs: Mapping[str, tuple]) -> tuple[bool, float | None]:
    """``impl``'s outputs against eager (and its ``agree_also`` impl): (agrees, error vs
    eager). A disagreement also warns; the case is timed anyway."""
    err = max_rel_error(got, refs["eager"])
    tol = agree_tolerance(spec, impl, dtype)
    ok = _agrees(err, tol)
    problems = [] if ok else [f"eager (max relative error {err}, tolerance {tol:.3g})"]
    if impl in spec.agree_also:
        other, other_tol = spec.agree_also[impl]
        other_tol = rounding_floor(other_tol, dtype)
        other_err = max_rel_error(got, refs[other])
        if not _agrees(other_err, other_tol):
            ok = False
            problems.append(f"{other} (max relative error {other_err}, tolerance {other_tol:.3g})")
    if not ok:
        warnings.warn(f"{spec.name} {dtype} {mode}: {impl} differs from " + " and ".join(problems)
                      + "; timing it anyway, its ratios print as FAIL", stacklevel=3)
    return ok, err


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

    # First call of each impl (for compile: the compilation), which also gives the outputs the
    # agreement check compares; the references (eager, agree_also targets) go first and are
    # kept, the others are checked at once and dropped.
    refs_needed = ["eager"] + [o for o, _ in spec.agree_also.values() if o != "eager"]
    missing = [n for n in refs_needed if n not in impls]
    if missing:
        raise ValueError(f"{spec.name}: agree_also names unknown impls {missing}")
    order = list(dict.fromkeys(refs_needed)) + [n for n in calls if n not in refs_needed]
    first_s, refs, agreement = {}, {}, {}
    for name in order:
        call = calls[name]
        first = _bind_checked(impls[name], inputs, mode, grad_outputs) if name in impls else call
        t0 = time.perf_counter()
        result = first()
        first_s[name] = time.perf_counter() - t0
        if name in refs_needed:
            refs[name] = result
        elif name in impls and name not in spec.raw:
            agreement[name] = _check_agreement(spec, tdtype, mode, name, result, refs)
        del result
        for _ in range(timing.warmup - 1):
            call()
    for name in refs_needed:  # a reference other than eager is checked too
        if name != "eager" and name not in spec.raw:
            agreement[name] = _check_agreement(spec, tdtype, mode, name, refs[name], refs)
    del refs
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
            gflops=flops / (ms[name] * 1e6) if flops else None,
            agrees=agreement[name][0] if name in agreement else None,
            max_rel_error=agreement[name][1] if name in agreement else None))
    return records


# ---------------------------------------------------------------- reporting

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
