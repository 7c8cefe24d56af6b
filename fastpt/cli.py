"""The ``fastpt`` command line (also ``python -m fastpt``).

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its options,
``_cmd_<name>(args)`` runs it and returns the exit code. Register new ones in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import math
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


def positive_int_arg(text: str) -> int:
    """argparse type: an integer >= 1 (the CLI's and the benchmark scripts' counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def seconds_arg(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds >= 0")
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
            "Full suite (every op x fp32,bf16 x its modes x 2 allocator modes, 8 s per case): ~17 min\n"
            "on 2 cores. --quick: smaller shapes, fp32 only unless --dtypes is given, 0.5 s per\n"
            "case: ~1.5 min even with a cold torch.compile cache."),
        epilog=(
            "--json writes a JSON list with one record object per line; fields: op, dtype, mode,\n"
            "shape, impl (fastpt | eager | compile | a named baseline), median_ms, ratio_vs_eager,\n"
            "ratio_vs_compile (on fastpt records, else null), pct_copy_bandwidth, alloc, and bytes,\n"
            "copy_gbps, threads, rounds, first_call_s (for compile: the compilation time), peak_mib\n"
            "(peak memory of one call, for ops that record it, else null), gflops, agrees (outputs\n"
            "matched eager before timing; false: ratios print FAIL) and max_rel_error. A requested\n"
            "case that a crashed child left unmeasured has one record with impl \"missing\" and null\n"
            "median_ms, ratios and pct_copy_bandwidth; the exit status is then 1."))
    p.add_argument("--quick", action="store_true",
                   help="smaller shapes, fp32 only (unless --dtypes), 0.5 s per case")
    p.add_argument("--ops", type=_csv(run.OPS), default=run.OPS, metavar="LIST",
                   help=f"ops to run, comma-separated (default: {','.join(run.OPS)})")
    p.add_argument("--dtypes", type=_csv(("fp32", "bf16", "fp16", "fp64")), default=None,
                   metavar="LIST",
                   help="dtypes, comma-separated from fp32,bf16,fp16,fp64 (default: fp32,bf16; "
                        "--quick: fp32; an op with none of them runs in its own first dtype)")
    p.add_argument("--modes", type=_csv(("fwd", "fwdbwd")), default=("fwd", "fwdbwd"),
                   metavar="LIST", help="fwd (forward) and/or fwdbwd (forward + backward with a "
                                        "fixed grad output) (default: fwd,fwdbwd)")
    p.add_argument("--alloc", type=_csv(run.ALLOCS), default=run.ALLOCS, metavar="LIST",
                   help="allocator modes, each in its own process: steady, default "
                        "(default: steady,default)")
    p.add_argument("--threads", type=positive_int_arg, default=2, metavar="N",
                   help="torch threads in the timed processes (default: 2)")
    p.add_argument("--budget", type=seconds_arg, default=None, metavar="SECONDS",
                   help="measuring time per case, after warm-up (default: 8; --quick: 0.5); "
                        "at least 5 timed calls per implementation")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON to PATH")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown to PATH")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (no compile records, ratio_vs_compile null)")
    _add_toml_config(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastpt.benchmarks import run
    from fastpt.benchmarks.rounds import check_output_paths
    check_output_paths(**{"--json": args.json, "--markdown": args.markdown})  # before the suite runs
    config = run.BenchConfig(ops=args.ops, dtypes=args.dtypes, modes=args.modes,
                             allocs=args.alloc, quick=args.quick, threads=args.threads,
                             compile=not args.no_compile, budget_s=args.budget)
    status, _ = run.run_suite(config, json_path=args.json, markdown_path=args.markdown)
    return status


def _add_mdp(sub) -> None:
    p = sub.add_parser(
        "mdp", help="solve the 4x3 gridworld and a random sparse MDP with value iteration",
        description="Solves Russell & Norvig's 4x3 gridworld (gamma 1, living reward -0.04) and "
                    "prints its values and policy, then a random sparse MDP "
                    "(fastpt.mdp.random_sparse_mdp) to epsilon with the sup-norm rule, and "
                    "prints sweeps, residual and time.")
    p.add_argument("--states", type=positive_int_arg, default=200_000, metavar="S",
                   help="states of the random MDP (default: 200000)")
    p.add_argument("--actions", type=positive_int_arg, default=4, metavar="A", help="(default: 4)")
    p.add_argument("--successors", type=positive_int_arg, default=16, metavar="K",
                   help="successors per (state, action) (default: 16)")
    p.add_argument("--gamma", type=float, default=0.9, help="discount (default: 0.9)")
    p.add_argument("--epsilon", type=float, default=1e-6, help="(default: 1e-6)")
    p.add_argument("--stop", choices=("sup", "span"), default="sup", help="stopping rule")
    p.add_argument("--gauss-seidel", action="store_true",
                   help="Gauss-Seidel sweeps (16 phases; fewer sweeps, same guarantee; sup rule only)")
    p.add_argument("--seed", type=int, default=0)
    _add_toml_config(p)
    p.set_defaults(func=_cmd_mdp)


def _cmd_mdp(args: argparse.Namespace) -> int:
    import time

    from fastpt import mdp
    if not 0 < args.gamma < 1:
        print(f"fastpt mdp: error: --gamma: expected a discount in (0, 1) (the random MDP has no "
              f"terminal states), got {args.gamma}", file=sys.stderr)
        return 2
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        print(f"fastpt mdp: error: --epsilon: expected a finite tolerance > 0, got {args.epsilon}",
              file=sys.stderr)
        return 2
    if args.gauss_seidel and args.stop == "span":  # was found after the gridworld had printed
        print("fastpt mdp: error: --gauss-seidel takes the sup rule only (--stop sup): the span rule's "
              "bounds hold for Jacobi sweeps", file=sys.stderr)
        return 2
    try:
        mdp.check_random_mdp_fits(args.states, args.actions, args.successors)
    except ValueError as e:
        print(f"fastpt mdp: error: --states x --actions x --successors: {e}", file=sys.stderr)
        return 2
    grid = mdp.gridworld_4x3()
    res = mdp.value_iteration(grid.mdp, 1e-6)
    print(f"4x3 gridworld: {res.iterations} sweeps, residual {res.residual:.2e}")
    print(grid.render(res.v, res.policy))
    t0 = time.perf_counter()
    try:
        m = mdp.random_sparse_mdp(args.states, args.actions, args.successors, args.seed,
                                  gamma=args.gamma)
        t1 = time.perf_counter()
        res = mdp.value_iteration(m, args.epsilon, stop=args.stop, gauss_seidel=args.gauss_seidel)
    except ValueError as e:
        print(f"fastpt mdp: error: {e}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    sweeps = "Gauss-Seidel" if args.gauss_seidel else "Jacobi"
    print(f"\nrandom sparse MDP: {m}\n  built in {t1 - t0:.2f} s; value iteration ({sweeps}, {args.stop} rule, "
          f"epsilon {args.epsilon:g}): {res.iterations} sweeps in {t2 - t1:.2f} s, residual "
          f"{res.residual:.2e}, converged {res.converged}; V in [{float(res.v.min()):.4f}, "
          f"{float(res.v.max()):.4f}]")
    return 0


def _benchmark_script(name: str, module: str, help: str) -> Callable:
    """A subcommand that hands its arguments, unparsed, to ``fastpt.benchmarks.<module>.main``
    (the script parses its own options, ``--help`` included)."""
    def add(sub) -> None:
        p = sub.add_parser(name, add_help=False, help=help)
        p.set_defaults(func=lambda args: importlib.import_module(f"fastpt.benchmarks.{module}").main(args.rest))
    return add


_add_bench_models = _benchmark_script(
    "bench-models", "models",
    "time the models (training step, decoding, encoder) against use_fused=False and transformers")
_add_bench_dropin = _benchmark_script(
    "bench-dropin", "dropin",
    "time transformers Llama patched vs unpatched, peft LoRA, bitsandbytes int8 vs fastpt")


def _training_commands() -> tuple:
    from fastpt.commands import evaluate, finetune, generate, pretrain
    return (pretrain.register, finetune.register, generate.register, evaluate.register)


def _add_demo(sub) -> None:
    from fastpt.commands import demo
    demo.register(sub)


def _add_lm_eval(sub) -> None:
    from fastpt.commands import lm_eval
    lm_eval.register(sub)


# Commands whose options belong to another tool (passed on as args.rest, unparsed).
PASS_THROUGH = ("bench-models", "bench-dropin", "lm-eval")


COMMANDS = (_add_demo, _add_bench, _add_bench_models, _add_mdp, *_training_commands(), _add_bench_dropin,
            _add_lm_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpt", description="fastpt: fused kernels for pre-training and fine-tuning transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, rest = build_parser().parse_known_args(argv)
        if rest and args.command not in PASS_THROUGH:
            build_parser().parse_args(argv)
        args.rest, args.argv = rest, list(sys.argv[1:] if argv is None else argv)
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while parsing or importing, or a second one in _run
        print("fastpt: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    """Runs a subcommand; user errors (bad options, files, checkpoints) become one line on
    stderr and exit status 2, and an interrupted training run says where to resume from."""
    from fastpt.commands.options import ConfigError
    from fastpt.models import CheckpointError as ModelCheckpointError
    from fastpt.train import CheckpointError
    from fastpt.train.interrupt import TrainingInterrupted
    try:
        if getattr(args, "toml_config", None):
            args = _with_toml_config(args)
        return args.func(args)
    except TrainingInterrupted as e:
        where = ""
        if e.checkpoint:  # (the demo saves one too, but has no --resume to continue from it)
            resume = ": run again with --resume" if getattr(args, "resumable", False) else ""
            where = f"; checkpoint in {e.checkpoint}{resume}"
        print(f"fastpt {args.command}: interrupted after step {e.step}{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (generate, eval, data prep, ...)
        print(f"fastpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, ModelCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"fastpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as e:
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        print(f"fastpt {args.command}: error: {what}", file=sys.stderr)
        return 2


def _add_toml_config(p: argparse.ArgumentParser) -> None:
    """--config for a command whose options are plain flags (bench, mdp): a TOML file whose
    keys are the flags' names (dashes or underscores), the flags given overriding it."""
    p.add_argument("--config", dest="toml_config", metavar="PATH",
                   help="a TOML file of these options (keys: the flag names without --, a list for a "
                        "comma-separated flag, true/false for a switch); flags given override it")


def _with_toml_config(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` parsed again with the --config file's values as the command's defaults;
    ConfigError naming the file and key for an unknown key or a value its flag refuses."""
    from fastpt.commands.options import ConfigError, read_toml
    path = args.toml_config
    table = read_toml(path)
    parser = build_parser()
    command = next(a for a in parser._actions if a.dest == "command").choices[args.command]
    actions = {a.dest: a for a in command._actions if a.dest not in ("help", "toml_config")}
    defaults = {}
    for key, value in table.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise ConfigError(f"{path}: unknown key '{key}'; {args.command} takes "
                              f"{', '.join(sorted(d.replace('_', '-') for d in actions))}")
        if action.nargs == 0:  # a switch such as --quick
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: key '{key}' must be true or false, got {value!r}")
        else:
            if isinstance(value, (dict, bool)) or (isinstance(value, list) and not all(
                    isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"{path}: key '{key}' must be a number, a string or a list of them, "
                                  f"got {value!r}")
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            try:
                value = action.type(text) if action.type else text
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise ConfigError(f"{path}: key '{key}': {e}") from None
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f"{path}: key '{key}' must be one of "
                                  f"{', '.join(map(str, action.choices))}, got {value!r}")
        defaults[action.dest] = value
    command.set_defaults(**defaults)
    again, _ = parser.parse_known_args(args.argv)
    again.rest, again.argv, again.toml_config = args.rest, args.argv, None
    return again


if __name__ == "__main__":
    sys.exit(main())
