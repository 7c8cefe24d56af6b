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
import time
from typing import Callable, Mapping, Sequence

import torch

from fastpt.alloc import peak_memory_bytes  # noqa: F401  (part of the harness API)
from fastpt.benchmarks.harness_agreement import (  # noqa: F401  (part of the harness API)
    _check_agreement, agree_tolerance, max_rel_error, rounding_floor)
from fastpt.benchmarks.harness_report import (  # noqa: F401  (part of the harness API)
    COLUMNS, FAIL, case_row, disagreement_line, disagreements, fail_or, failure_note, group_cases, markdown_table,
    read_json, text_header, text_row, write_json, write_markdown)
from fastpt.benchmarks.harness_types import (  # noqa: F401  (part of the harness API)
    DTYPES, MODES, Inputs, OpSpec, Record, Timing, check_rounds)


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
