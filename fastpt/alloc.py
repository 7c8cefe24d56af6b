"""Opt-in allocator setting for memory-bound work on CPU, and the peak memory of a call.

glibc hands every freed block above its mmap threshold (at most 32 MiB on 64-bit) back to
the OS, so each new large tensor page-faults its memory in again. For memory-bound ops that
cost dominates: here a 512 MiB ``clone`` runs at ~5.5 GB/s against ~19.4 GB/s for a copy
into an existing buffer. Keeping freed memory in the heap removes it.

The same setting can be given at process start through the environment (what
``fastpt bench --alloc steady`` does for its child processes)::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824

or at run time, from Python, with :func:`use_steady_allocator`. Nothing calls it on import:
the price is a process that keeps its peak heap size until it exits, so training commands
apply it only when asked to.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from typing import Callable

# <malloc.h> parameter numbers for mallopt(3).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# mallopt takes an int, so the run-time trim threshold stops at INT_MAX (2 GiB of free
# heap top before glibc trims) where the environment variable allows 64 GiB.
_INT_MAX = 2**31 - 1
TOP_PAD = 1 << 30

STEADY_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}
"""The steady setting as environment variables; glibc reads them once, at process start."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def use_steady_allocator() -> bool:
    """Keep freed memory in this process's heap instead of returning it to the OS.

    Sets, through glibc's ``mallopt``: no mmap for large blocks (M_MMAP_MAX = 0), no
    trimming of the heap top below 2 GiB free (M_TRIM_THRESHOLD), and 1 GiB of padding on
    each heap growth (M_TOP_PAD). Affects allocations made after the call; blocks already
    mmap'ed are still returned to the OS when freed.

    Returns:
        True if every setting was applied, False where the C library has no ``mallopt``
        (not glibc, e.g. macOS or musl) or refused a setting. Never raises.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX), (M_TOP_PAD, TOP_PAD))
    # mallopt returns 1 on success, 0 on error.
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 to /dev/null for the block: the profiler's C++ side (kineto)
    prints "profiler_start"/"profiler_stop" lines there on every use, whatever its log level,
    which would interleave with tables and progress bars. Python's sys.stderr is flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(call: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during call() beyond those held before it:
    the running sum of the profiler's allocation records (each allocation and free with
    its own timestamp, temporaries inside fused ops included). The profiler's own messages
    on stderr are suppressed."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    steps, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            steps.append((node.start_time_ns, node.extra_fields.alloc_size))
    held = peak = 0
    for _, change in sorted(steps):
        held += change
        peak = max(peak, held)
    return peak
