"""Small pieces the subcommands share: rank-0 printing, resume folders, loading a model
with its tokenizer."""

from __future__ import annotations

import json
import os

import torch

from fastpt._atomic import atomic_write_json
from fastpt.commands.options import ConfigError


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def say(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


def checkpoint_root(output_dir: str, resume: bool) -> str | None:
    """The checkpoint root to resume from, or None for a fresh run. A fresh run never
    writes over the checkpoints of an earlier one."""
    root = os.path.join(output_dir, "checkpoints")
    has = os.path.isfile(os.path.join(root, "latest"))
    if resume and not has:
        raise ConfigError(f"resume: no checkpoint in {root} to resume from")
    if not resume and has:
        raise ConfigError(f"output_dir {output_dir} already holds checkpoints: pass --resume to "
                          "continue that run, or choose another output_dir")
    return root if resume else None


def save_options(output_dir: str, command: str, values: dict) -> None:
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_json(os.path.join(output_dir, f"{command}_options.json"), values)


def load_model_and_tokenizer(path: str):
    """A fastpt model folder (HF layout, with tokenizer.json) -> (model, tokenizer). Merged
    fine-tuned checkpoints come back with their task head."""
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.finetune import load_merged
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path}: not a model folder (no config.json)")
    model = load_merged(path)
    return model.eval(), load_tokenizer(path)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, with the line number of a malformed one."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows
