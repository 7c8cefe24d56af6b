"""Runs the benchmark suite: one child process per allocator mode, records merged.

glibc reads its malloc settings once, at process start, so each allocator mode runs in a
child started with its environment: ``python -m fastpt.benchmarks.run CONFIG_JSON OUT``
(CONFIG_JSON: a :class:`BenchConfig` as JSON, with one alloc; OUT: a file the child appends
one line per case to, as it finishes the case: a JSON list of the case's records, so a line
cut short by a crash does not parse and its case counts as missing). The child prints its
table rows as it goes. ``fastpt bench`` (fastpt/cli.py) calls :func:`run_suite`.

A child that exits with a non-zero status (an exception, a signal, ``os._exit``), or leaves
a requested case without records, makes the suite's output visibly incomplete
(:class:`ChildRun`): the console and the Markdown say which alloc run crashed, with its
exit status, and list the requested (op, dtype, mode, shape) cases with no record; the JSON
holds, for each such case, a placeholder record with ``impl`` = ``"missing"`` (``MISSING``)
and null times and ratios, so the file still reads as one record object per line
(:func:`harness.read_json`); and ``run_suite`` returns status 1.

Adding an op: a module ``benchmarks/<op>.py`` defining ``SPEC`` (a harness.OpSpec), and its
name in ``OPS``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from fastpt.alloc import STEADY_ENV
from fastpt.benchmarks import harness
from fastpt.benchmarks.rounds import check_output_paths

OPS = ("rms_norm", "swiglu", "rope", "attention", "attention_causal", "linear", "int8_matmul",
       "int8_linear", "lora_linear", "value_iteration_sparse", "value_iteration_dense",
       "value_iteration_solve")
ALLOCS = ("steady", "default")
# Per-case measuring time (alternating rounds) by suite size.
BUDGET_S = {"full": 8.0, "quick": 0.5}
QUICK_DTYPES = ("fp32",)
# ``impl`` of the JSON placeholder for a requested case that a crashed child left without records.
MISSING = "missing"


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
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        if self.budget_s is None:
            self.budget_s = BUDGET_S["quick" if self.quick else "full"]
        if not (self.budget_s >= 0 and math.isfinite(self.budget_s)):
            raise ValueError(f"budget_s must be >= 0 and finite, got {self.budget_s}")

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


def requested_cases(config: BenchConfig) -> list[tuple[harness.OpSpec, dict, str, str]]:
    """Every case ``config`` asks for, in the order they run: (spec, shapes, dtype, mode)."""
    cases = []
    for op in config.ops:
        spec = load_spec(op)
        # An op with none of the selected dtypes (the MDP ops are fp64/fp32) runs in its first.
        dtypes = [d for d in config.dtypes if d in spec.dtypes] or [spec.dtypes[0]]
        for shapes in harness.shape_cases(spec.shapes[config.size]):
            for dtype in dtypes:
                cases += [(spec, shapes, dtype, m) for m in config.modes if m in spec.modes]
    return cases


def run_cases(config: BenchConfig, alloc: str, out_path: str | None = None) -> list[harness.Record]:
    """Measures every case of ``config`` in this process, printing a row per case (and, with
    ``out_path``, appending the case's records to it as one JSON line)."""
    torch.set_num_threads(config.threads)
    timing = harness.Timing(budget_s=config.budget_s)
    records = []
    print(harness.text_header(), flush=True)
    for spec, shapes, dtype, mode in requested_cases(config):
        case = harness.measure_case(spec, shapes, dtype, mode, alloc=alloc,
                                    compile=config.compile, timing=timing,
                                    threads=config.threads)
        print(harness.text_row(case), flush=True)
        records += case
        if out_path:
            with open(out_path, "a") as f:
                f.write(json.dumps([asdict(r) for r in case]) + "\n")
    if not records:
        print("no case matches the selected ops, dtypes and modes", flush=True)
    return records


def read_child_records(path: str) -> list[harness.Record]:
    """The records of a child's output file (see the module docstring); a line that does not
    parse (cut short by a crash) is skipped, and its case counts as missing."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                case = [harness.Record(**d) for d in json.loads(line)]
            except (ValueError, TypeError):
                continue
            records += case
    return records


@dataclass
class ChildRun:
    """One allocator mode's child: its exit status, its records, and the requested cases
    (op, dtype, mode, shape) it left without a record."""

    alloc: str
    returncode: int
    records: list[harness.Record]
    missing: list[tuple[str, str, str, str]]
    requested: int = 0

    @property
    def complete(self) -> bool:
        return self.returncode == 0 and not self.missing

    def status_text(self) -> str:
        rc = self.returncode
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"exit status {rc}, killed by {name}"
        return f"exit status {rc}"

    def problem(self) -> str:
        """One line: what went wrong (empty when complete)."""
        if self.complete:
            return ""
        what = "crashed" if self.returncode != 0 else "ended"
        cases = (f"{len(self.missing)} of {self.requested} requested cases have no record"
                 if self.missing else "every requested case has a record")
        return f"the {self.alloc} run {what} ({self.status_text()}); {cases}"

    def placeholders(self) -> list[harness.Record]:
        """A JSON placeholder record (impl ``MISSING``, null times and ratios) per missing case."""
        return [harness.Record(op=op, dtype=dtype, mode=mode, shape=shape, impl=MISSING,
                               median_ms=None, ratio_vs_eager=None, ratio_vs_compile=None,
                               pct_copy_bandwidth=None, alloc=self.alloc)
                for op, dtype, mode, shape in self.missing]


def _run_child(config: BenchConfig, alloc: str, workdir: str) -> ChildRun:
    out = os.path.join(workdir, f"records-{alloc}.jsonl")
    child = BenchConfig(**{**asdict(config), "allocs": (alloc,)})
    # cwd = workdir: `python -m` puts the cwd on sys.path, and the repository root holds a
    # source fastpt/ without the compiled _C.
    rc = subprocess.call([sys.executable, "-m", "fastpt.benchmarks.run",
                          json.dumps(asdict(child)), out],
                         env=child_env(alloc, config.threads), cwd=workdir)
    records = read_child_records(out)
    done = {(r.op, r.dtype, r.mode, r.shape) for r in records}
    requested = [(spec.name, dtype, mode, harness.shape_str(shapes))
                 for spec, shapes, dtype, mode in requested_cases(config)]
    return ChildRun(alloc, rc, records, [c for c in requested if c not in done], len(requested))


def incomplete_text(runs: list[ChildRun], markdown: bool = False) -> str:
    """What the incomplete runs among ``runs`` lack ("" if none): a headline per run and
    its missing cases, for the console or (``markdown``) the Markdown file."""
    blocks = []
    for child in (r for r in runs if not r.complete):
        head = f"INCOMPLETE: {child.problem()}" + (":" if child.missing else ".")
        cases = [f"{child.alloc} {' '.join(c)}" for c in child.missing]
        if markdown:
            lines = [f"**{head}**", *([""] if cases else []), *(f"- {c}" for c in cases)]
        else:
            lines = [head, *(f"  {c}" for c in cases)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family and model numbers where Linux gives them, else
    ``platform.processor()`` or the machine type. (This project's VMs all report "AMD EPYC":
    family 25 model 1 is Zen 3, AVX2 only; family 26 is Zen 5, AVX-512.)"""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break  # the first processor's block is enough
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe_machine(config: BenchConfig) -> str:
    import fastpt
    info = fastpt.build_info()
    return (f"fastpt {info['version']}, torch {torch.__version__}, {cpu_model()}, "
            f"{os.cpu_count()} cores, {config.threads} threads, kernels {info['cpu_capability']}, "
            f"{'quick' if config.quick else 'full'} shapes, {time.strftime('%Y-%m-%d %H:%M')}")


def run_suite(config: BenchConfig, json_path: str | None = None,
              markdown_path: str | None = None) -> tuple[int, list[harness.Record]]:
    """Runs each allocator mode in its own child process; writes JSON and Markdown of the
    merged records. Returns (exit code: 0 if every child succeeded and left a record for
    every requested case, else 1; the records measured). An incomplete child run is
    reported on the console, atop the Markdown table, and in the JSON (see the module
    docstring). Both paths are checked before anything runs (rounds.check_output_paths)."""
    check_output_paths(json_path=json_path, markdown_path=markdown_path)
    start = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastpt-bench-") as workdir:
        for alloc in config.allocs:
            print(f"\n== alloc {alloc} ==", flush=True)
            child = _run_child(config, alloc, workdir)
            if not child.complete:
                print(f"error: {child.problem()}", file=sys.stderr, flush=True)
            runs.append(child)
    records = [r for child in runs for r in child.records]
    status = 0 if all(child.complete for child in runs) else 1
    wall = time.perf_counter() - start
    preamble = f"{describe_machine(config)}; suite wall time {wall:.0f} s"
    if json_path is not None:
        harness.write_json([r for child in runs for r in child.records + child.placeholders()],
                           json_path)
    if markdown_path is not None:
        notice = incomplete_text(runs, markdown=True)
        harness.write_markdown(records, markdown_path,
                               preamble=preamble + (f"\n\n{notice}" if notice else ""))
    print(f"\n{preamble}", flush=True)
    if status:
        print(f"\n{incomplete_text(runs)}", flush=True)
    return status, records


def _child_main(argv: list[str]) -> int:
    config_json, out_path = argv
    config = BenchConfig(**json.loads(config_json))
    run_cases(config, config.allocs[0], out_path)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
