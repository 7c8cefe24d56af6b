"""``fastpt bench-dropin``: the drop-in benchmarks (benchmarks/dropin.py); options are its own."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "bench-dropin", add_help=False,
        help="time transformers Llama patched vs unpatched, peft LoRA, bitsandbytes int8 vs fastpt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastpt.benchmarks import dropin
    return dropin.main(args.rest)
