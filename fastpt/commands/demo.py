"""``fastpt demo``: benchmarks, pre-training, fine-tuning, in-context learning and MDPs on
the embedded data, offline, with a Markdown report and plots (fastpt.demo)."""

from __future__ import annotations

import argparse
import dataclasses

from fastpt.commands.options import ConfigError, add_options, options_from_dataclass, resolve
from fastpt.demo.config import HELPS, SIZES, TABLE_OF, DemoConfig


def _help(name: str) -> str:
    text = HELPS[name]
    if name in SIZES["quick"]:
        quick, full = SIZES["quick"][name], SIZES["full"][name]
        show = (lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v)
        text += f"; none: {show(full)}, or {show(quick)} with --quick"
    return text


def _options():
    fields = [f.name for f in dataclasses.fields(DemoConfig)]
    out = []
    for table in dict.fromkeys(TABLE_OF.values()):
        skip = tuple(f for f in fields if TABLE_OF[f] != table)
        out += options_from_dataclass(DemoConfig, table, skip=skip, helps={f: _help(f) for f in fields})
    return out


OPTIONS = _options()


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the tour: benchmarks, pre-training, fine-tuning, in-context learning, MDPs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Runs, on the embedded world corpus and offline, five sections and prints their\n"
            "tables as it goes:\n"
            "  kernels   fastpt's fused ops vs eager PyTorch and torch.compile (small shapes)\n"
            "  pretrain  a tiny encoder (MLM) and a tiny decoder (causal LM): loss curves\n"
            "  finetune  full / partial / linear probe / LoRA / adapters / prompt tuning vs\n"
            "            training from scratch: accuracy, trainable parameters, time, memory\n"
            "  icl       zero/one/few-shot accuracy of the pre-trained decoder\n"
            "  mdp       value iteration on the 4x3 gridworld and a large random sparse MDP\n"
            "It writes report.md with PNG plots (and the pre-trained models) into the output\n"
            "folder, whose path it prints at the end. Full run: <= 10 minutes on 2 cores;\n"
            "--quick: <= 2 minutes. A failing section is reported and the exit status is 1."),
        epilog="Example: fastpt demo --quick --sections pretrain,icl --out runs/my-demo\n"
               "Every option is also a key of a TOML file: fastpt demo --config configs/demo.toml")
    add_options(p, OPTIONS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastpt.demo import run_demo
    values = resolve(args, OPTIONS)
    try:
        config = DemoConfig(**values)
    except ValueError as e:
        key = str(e).split(":", 1)[0]
        table = TABLE_OF.get(key)
        raise ConfigError(f"{table}.{e}" if table else str(e)) from None
    return run_demo(config)
