"""The ``fastpt`` command line (also ``python -m fastpt``).

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its options,
``_cmd_<name>(args)`` runs it and returns the exit code. Register new ones in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _csv(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated list whose items must be in ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return tuple(dict.fromkeys(items))
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds >= 0")
    return value


def _add_bench(sub) -> None:
    from fastpt.benchmarks import run
    p = sub.add_parser(
        "bench", help="time fastpt's ops against eager PyTorch and torch.compile",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Time each op (fastpt, eager PyTorch, torch.compile of the eager code) in one process,\n"
            "alternating, with this machine's copy bandwidth measured in the same run; prints a\n"
            "row per case: median ms, ratios (baseline time / fastpt time) and % of copy bandwidth.\n"
            "Each allocator mode runs in a child process: 'steady' keeps freed memory in glibc's\n"
            "heap (measures the kernels), 'default' is glibc's default (large outputs page-fault).\n"
            "Full suite (3 ops x fp32,bf16 x fwd,fwdbwd x 2 allocator modes, 8 s per case): ~5 min\n"
            "on 2 cores. --quick: smaller shapes, fp32 only unless --dtypes is given, 0.5 s per\n"
            "case: ~1.5 min even with a cold torch.compile cache."),
        epilog=(
            "--json writes a JSON list with one record object per line; fields: op, dtype, mode,\n"
            "shape, impl (fastpt | eager | compile | a named baseline), median_ms, ratio_vs_eager,\n"
            "ratio_vs_compile (on fastpt records, else null), pct_copy_bandwidth, alloc, and bytes,\n"
            "copy_gbps, threads, rounds, first_call_s (for compile: the compilation time)."))
    p.add_argument("--quick", action="store_true",
                   help="smaller shapes, fp32 only (unless --dtypes), 0.5 s per case")
    p.add_argument("--ops", type=_csv(run.OPS), default=run.OPS, metavar="LIST",
                   help=f"ops to run, comma-separated (default: {','.join(run.OPS)})")
    p.add_argument("--dtypes", type=_csv(("fp32", "bf16", "fp16")), default=None, metavar="LIST",
                   help="dtypes, comma-separated from fp32,bf16,fp16 (default: fp32,bf16; "
                        "--quick: fp32)")
    p.add_argument("--modes", type=_csv(("fwd", "fwdbwd")), default=("fwd", "fwdbwd"),
                   metavar="LIST", help="fwd (forward) and/or fwdbwd (forward + backward with a "
                                        "fixed grad output) (default: fwd,fwdbwd)")
    p.add_argument("--alloc", type=_csv(run.ALLOCS), default=run.ALLOCS, metavar="LIST",
                   help="allocator modes, each in its own process: steady, default "
                        "(default: steady,default)")
    p.add_argument("--threads", type=_positive_int, default=2, metavar="N",
                   help="torch threads in the timed processes (default: 2)")
    p.add_argument("--budget", type=_seconds, default=None, metavar="SECONDS",
                   help="measuring time per case, after warm-up (default: 8; --quick: 0.5); "
                        "at least 5 timed calls per implementation")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON to PATH")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown to PATH")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (no compile records, ratio_vs_compile null)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastpt.benchmarks import run
    config = run.BenchConfig(ops=args.ops, dtypes=args.dtypes, modes=args.modes,
                             allocs=args.alloc, quick=args.quick, threads=args.threads,
                             compile=not args.no_compile, budget_s=args.budget)
    status, _ = run.run_suite(config, json_path=args.json, markdown_path=args.markdown)
    return status


def _add_bench_models(sub) -> None:
    p = sub.add_parser(
        "bench-models", add_help=False,
        help="time the models (training step, decoding, encoder) against use_fused=False and transformers")
    p.set_defaults(func=_cmd_bench_models)


def _cmd_bench_models(args: argparse.Namespace) -> int:
    from fastpt.benchmarks import models
    return models.main(args.rest)


COMMANDS = (_add_bench, _add_bench_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpt", description="fastpt: fused kernels for pre-training and fine-tuning transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command != "bench-models":  # only bench-models passes its options on
        build_parser().parse_args(argv)
    args.rest = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
