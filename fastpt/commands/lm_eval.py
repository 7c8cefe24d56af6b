"""``fastpt lm-eval``: lm-evaluation-harness with the "fastpt" model type registered.

lm-eval discovers a third-party model only after its module is imported, so a bare
``lm_eval --model fastpt`` cannot find it; this command imports
:mod:`fastpt.icl.lm_eval_harness` and hands every other option to lm-eval's own command line
(``--model fastpt`` is added when no ``--model`` is given).
"""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "lm-eval", add_help=False,
        help="run lm-evaluation-harness on a fastpt model folder (options are lm-eval's)",
        description="lm-evaluation-harness with model type fastpt; all options are lm-eval's.")
    p.set_defaults(func=run)


def lm_eval_argv(rest: list[str]) -> list[str]:
    """lm-eval's ``run`` arguments for ``fastpt lm-eval REST``."""
    args = list(rest)
    if args and args[0] in ("run", "ls", "validate"):
        return args
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "fastpt", *args]
    return ["run", *args]


def run(args: argparse.Namespace) -> int:
    wants_help = not args.rest or args.rest[0] in ("-h", "--help")
    if wants_help:
        print("usage: fastpt lm-eval [--model fastpt] --model_args pretrained=PATH --tasks TASK "
              "[--include_path DIR] [other lm-eval run options]\n\n" + __doc__.strip())
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        if wants_help:
            print("\nlm-eval is not installed: pip install lm-eval (or fastpt[test])")
            return 0
        raise ValueError("lm-eval is not installed: pip install lm-eval (or fastpt[test])") from None
    import fastpt.icl.lm_eval_harness  # noqa: F401  (registers the "fastpt" model type)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    if wants_help:
        print("\nlm-eval's options:")
        args.rest = ["run", "--help"]
    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", *lm_eval_argv(args.rest)]
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    finally:
        sys.argv = saved
    return 0
