"""Runs the benchmark suite: one child process per allocator mode, records merged.

glibc reads its malloc settings once, at process start, so each allocator mode runs in a
child started with its environment: ``python -m fastpt.benchmarks.run CONFIG_JSON OUT``
(CONFIG_JSON: a :class:`BenchConfig` as JSON, with one alloc; OUT: a JSON-lines file the
child appends one record per line to, case by case). The child prints its table rows as
it goes. ``fastpt bench`` (fastpt/cli.py) calls :func:`run_suite`.

Adding an op: a module ``benchmarks/<op>.py`` defining ``SPEC`` (a harness.OpSpec), and its
name in ``OPS``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from fastpt.alloc import STEADY_ENV
from fastpt.benchmarks import harness

OPS = ("rms_norm", "swiglu", "rope", "attention", "attention_causal", "linear", "int8_matmul",
       "int8_linear", "lora_linear", "value_iteration_sparse", "value_iteration_dense",
       "value_iteration_solve")
ALLOCS = ("steady", "default")
# Per-case measuring time (alternating rounds) by suite size.
BUDGET_S = {"full": 8.0, "quick": 0.5}
QUICK_DTYPES = ("fp32",)


def load_spec(op: str) -> harness.OpSpec:
    return importlib.import_module(f"fastpt.benchmarks.{op}").SPEC


@dataclass
class BenchConfig:
    """What to run. ``dtypes=None`` means fp32 and bf16 (fp32 only with ``quick``)."""

    ops: tuple[str, ...] = OPS
    dtypes: tuple[str, ...] | None = None
    modes: tuple[str, ...] = harness.MODES
    allocs: tuple[str, ...] = ALLOCS
    quick: bool = False
    threads: int = 2
    compile: bool = True
    budget_s: float | None = None

    def __post_init__(self):
        self.ops, self.modes, self.allocs = tuple(self.ops), tuple(self.modes), tuple(self.allocs)
        if self.dtypes is None:
            self.dtypes = QUICK_DTYPES if self.quick else ("fp32", "bf16")
        self.dtypes = tuple(self.dtypes)
        for name, values, allowed in (("ops", self.ops, OPS), ("dtypes", self.dtypes, harness.DTYPES),
                                      ("modes", self.modes, harness.MODES),
                                      ("allocs", self.allocs, ALLOCS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(values)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.budget_s is None:
            self.budget_s = BUDGET_S["quick" if self.quick else "full"]
        if not self.budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0, got {self.budget_s}")

    @property
    def size(self) -> str:
        return "quick" if self.quick else "full"


def child_env(alloc: str, threads: int) -> dict[str, str]:
    """The environment of the child for one allocator mode (glibc defaults for 'default')."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") and k.endswith("_"))}
    if alloc == "steady":
        env.update(STEADY_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_cases(config: BenchConfig, alloc: str, out_path: str | None = None) -> list[harness.Record]:
    """Measures every case of ``config`` in this process, printing a row per case."""
    torch.set_num_threads(config.threads)
    timing = harness.Timing(budget_s=config.budget_s)
    records = []
    print(harness.text_header(), flush=True)
    for op in config.ops:
        spec = load_spec(op)
        # An op with none of the selected dtypes (the MDP ops are fp64/fp32) runs in its first.
        dtypes = [d for d in config.dtypes if d in spec.dtypes] or [spec.dtypes[0]]
        for shapes in harness.shape_cases(spec.shapes[config.size]):
            for dtype in dtypes:
                for mode in (m for m in config.modes if m in spec.modes):
                    case = harness.measure_case(spec, shapes, dtype, mode, alloc=alloc,
                                                compile=config.compile, timing=timing,
                                                threads=config.threads)
                    print(harness.text_row(case), flush=True)
                    records += case
                    if out_path:
                        with open(out_path, "a") as f:
                            f.writelines(json.dumps(asdict(r)) + "\n" for r in case)
    if not records:
        print("no case matches the selected ops, dtypes and modes", flush=True)
    return records


def _run_child(config: BenchConfig, alloc: str, workdir: str) -> tuple[int, list[harness.Record]]:
    out = os.path.join(workdir, f"records-{alloc}.jsonl")
    child = BenchConfig(**{**asdict(config), "allocs": (alloc,)})
    # cwd = workdir: `python -m` puts the cwd on sys.path, and the repository root holds a
    # source fastpt/ without the compiled _C.
    rc = subprocess.call([sys.executable, "-m", "fastpt.benchmarks.run",
                          json.dumps(asdict(child)), out],
                         env=child_env(alloc, config.threads), cwd=workdir)
    records = []
    if os.path.exists(out):
        with open(out) as f:
            records = [harness.Record(**json.loads(line)) for line in f if line.strip()]
    return rc, records


def describe_machine(config: BenchConfig) -> str:
    import fastpt
    info = fastpt.build_info()
    return (f"fastpt {info['version']}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {config.threads} threads, kernels {info['cpu_capability']}, "
            f"{'quick' if config.quick else 'full'} shapes, {time.strftime('%Y-%m-%d %H:%M')}")


def run_suite(config: BenchConfig, json_path: str | None = None,
              markdown_path: str | None = None) -> tuple[int, list[harness.Record]]:
    """Runs each allocator mode in its own child process; writes JSON and Markdown of the
    merged records. Returns (exit code: 0 if every child succeeded, records)."""
    start = time.perf_counter()
    records, status = [], 0
    with tempfile.TemporaryDirectory(prefix="fastpt-bench-") as workdir:
        for alloc in config.allocs:
            print(f"\n== alloc {alloc} ==", flush=True)
            rc, recs = _run_child(config, alloc, workdir)
            if rc != 0:
                print(f"error: the {alloc} run exited with status {rc}", file=sys.stderr)
                status = 1
            records += recs
    wall = time.perf_counter() - start
    preamble = f"{describe_machine(config)}; suite wall time {wall:.0f} s"
    if json_path:
        harness.write_json(records, json_path)
    if markdown_path:
        harness.write_markdown(records, markdown_path, preamble=preamble)
    print(f"\n{preamble}", flush=True)
    return status, records


def _child_main(argv: list[str]) -> int:
    config_json, out_path = argv
    config = BenchConfig(**json.loads(config_json))
    run_cases(config, config.allocs[0], out_path)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
