"""``run_demo(config)``: runs the selected sections in order, each timed and isolated (a
failing section is reported in report.md and on stderr, and the others still run), then
writes the report and returns the exit status (0: every section ran; 1: some failed). A
section stopped by KeyboardInterrupt (or any other BaseException) is marked "interrupted" in
the report, which is still written, and the exception goes on up."""

from __future__ import annotations

import importlib
import os
import sys
import time

import torch

from fastpt._atomic import atomic_write_json
from fastpt.demo.config import SECTIONS, TITLES, DemoConfig
from fastpt.demo.context import Context
from fastpt.demo.report import Report

MODULES = {"kernels": "kernels", "pretrain": "pretraining", "finetune": "finetuning",
           "icl": "icl", "mdp": "mdp"}
"""Section name -> module of fastpt.demo with its ``run(ctx, section)``."""

TRAINING = ("pretrain", "finetune", "icl")
"""Sections that run on ``train_threads`` (the others on ``threads``)."""


def new_output_dir(out: str | None, root: str = "runs") -> str:
    """The folder to write into, created: ``out`` when given (it must not exist yet or be
    empty), else a new ``runs/demo-<date>-<time>`` (suffixed -2, -3, ... if that exists).
    Never writes into an earlier run. Raises ValueError for a non-empty ``out``."""
    if out is not None:
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ValueError(f"out: {out} already exists and is not an empty folder; "
                             "choose another (the demo never overwrites a run)")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out: cannot create {out} ({e.strerror or e})") from None
        return out
    base = os.path.join(root, time.strftime("demo-%Y%m%d-%H%M%S"))
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            if not os.path.isdir(path):
                raise ValueError(f"out: cannot create {path}: {path} is a file") from None
            n += 1
            path = f"{base}-{n}"
        except OSError as e:
            raise ValueError(f"out: cannot create {path} ({e.strerror or e})") from None


def describe(config: DemoConfig) -> str:
    import fastpt
    from fastpt.benchmarks.run import cpu_model
    info = fastpt.build_info()
    return (f"fastpt {info['version']}, torch {torch.__version__}, "
            f"{cpu_model()}, {os.cpu_count()} cores, "
            f"{config.threads} threads ({config.train_threads} for the tiny models), "
            f"kernels {info['cpu_capability']}; "
            f"{config.size} demo, seed {config.seed}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


def run_demo(config: DemoConfig) -> int:
    """Runs the demo; prints the tables as they come and the report's path at the end."""
    out = new_output_dir(config.out)
    threads = torch.get_num_threads()
    ctx = Context(config, out)
    atomic_write_json(ctx.path("demo_config.json"), config.to_dict())
    report = Report(out, "fastpt demo", f"{describe(config)}.\n\nMade by `fastpt demo"
                    f"{' --quick' if config.quick else ''}` with the options in `demo_config.json`. "
                    "Times are wall-clock seconds on this machine; other jobs running on it slow "
                    "them down.")
    print(f"fastpt demo ({config.size}): {', '.join(config.sections)} -> {out}", flush=True)
    stopped = True  # until every section has run
    try:
        for key in (s for s in SECTIONS if s in config.sections):
            sec = report.section(key, TITLES[key])
            torch.set_num_threads(config.train_threads if key in TRAINING else config.threads)
            start = time.perf_counter()
            try:
                importlib.import_module(f"fastpt.demo.{MODULES[key]}").run(ctx, sec)
            except Exception as e:  # noqa: BLE001  (reported, the demo goes on)
                sec.fail(e)
                print(f"fastpt demo: section {key} failed: {sec.error}", file=sys.stderr, flush=True)
            except BaseException as e:  # Ctrl-C, SystemExit: marked in the report, then stop
                sec.interrupt(e)
                sec.seconds = time.perf_counter() - start
                raise
            sec.seconds = time.perf_counter() - start
            print(f"({key}: {sec.seconds:.1f} s)", flush=True)
        stopped = False
    finally:
        torch.set_num_threads(threads)
        path = report.write()
        if stopped:
            print(f"\nfastpt demo: stopped; the report of what ran: {path}", file=sys.stderr, flush=True)
    rows = report.summary_rows()
    print("\n" + "\n".join(f"{name:<50} {status:>10} {seconds:>8} s" for name, status, seconds in rows))
    print(f"\nreport: {path}", flush=True)
    if report.failed:
        print(f"fastpt demo: {len(report.failed)} section(s) failed: "
              f"{', '.join(s.key for s in report.failed)} (see {path})", file=sys.stderr)
        return 1
    return 0
