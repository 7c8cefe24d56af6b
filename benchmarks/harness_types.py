"""The harness's data types: an op's :class:`OpSpec` and :class:`Inputs`, a :class:`Timing`, a :class:`Record`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "fwdbwd")


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
