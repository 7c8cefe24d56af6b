"""Small pieces the subcommands share: rank-0 printing, resume folders, loading a model
with its tokenizer."""

from __future__ import annotations

import json
import os
import tempfile

import torch

from fastpt._atomic import atomic_write_json
from fastpt.commands.options import ConfigError


def is_main_process() -> bool:
    """Rank 0, or a single process. Before the Trainer starts the process group, torchrun's
    RANK says which process this is (otherwise every rank printed the first lines)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


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


def check_resume_step(resume_from: str | None, max_steps: int) -> None:
    """A resumed run must have steps left: refuses a checkpoint already at ``max_steps``
    (which would otherwise train nothing and rewrite the final model)."""
    if resume_from is None:
        return
    from fastpt.train import checkpoint
    try:
        with open(os.path.join(checkpoint.resolve(resume_from), checkpoint.STATE_FILE)) as f:
            step = json.load(f).get("step")
    except Exception:  # noqa: BLE001  (the trainer reports a broken checkpoint in full)
        return
    if isinstance(step, int) and not isinstance(step, bool) and step >= max_steps:
        raise ConfigError(f"resume: the checkpoint in {resume_from} is already at step {step} >= "
                          f"train.max_steps {max_steps}; nothing to do (raise --max-steps to train on)")


def _check_writable_folder(folder: str, key: str, path: str) -> None:
    """Raises ConfigError unless ``folder`` is, or can be created as, a folder this process
    can write into (tried for real: a temporary file in its nearest existing ancestor)."""
    probe = os.path.abspath(folder or ".")
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}: cannot write {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write {path}: {probe} is not writable "
                          f"({e.strerror or e})") from None


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """Before any work: ``path`` must be a folder, or creatable as one, that we can write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} exists and is not a folder")
    _check_writable_folder(path, key, path)


def check_output_file(path: str, key: str = "output") -> None:
    """Before any work: ``path`` must be a file name (not a folder) in an existing, writable
    folder. Nothing creates that folder, so a missing one would only fail at the write, after
    the work (and its results) were done."""
    if os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    _check_writable_folder(folder, key, path)
    if not os.path.isdir(folder):
        raise ConfigError(f"{key}: cannot write {path}: the folder {folder} does not exist "
                          "(create it first)")


def trainer_config(output_dir: str, values: dict, section: str = "train", **extra):
    """The TrainerConfig of a command's [train] options, built (and so checked) before
    anything is written; its errors become ConfigErrors."""
    from fastpt.train.config import TrainerConfig
    try:
        return TrainerConfig(output_dir=output_dir, **values, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None


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


class Records(list):
    """read_jsonl's records; ``lines[i]`` is the line number of record ``i``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lines: list[int] = []


def where(path: str, rows: list, i: int) -> str:
    """'path:line' of record ``i`` (0-based) of ``rows``, or 'path: record i+1'."""
    lines = getattr(rows, "lines", None)
    return f"{path}:{lines[i]}" if lines and i < len(lines) else f"{path}: record {i + 1}"


def check_label(label, at: str, field: str = "label"):
    """A class label: a string or an integer (not a bool, a float, null, a list or an object;
    JSON's 1, true and 1.0 would otherwise be the same class)."""
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        shown = "null" if label is None else f"{type(label).__name__} {label!r}"
        raise ValueError(f"{at}: {field!r} must be a string or an integer, got {shown}")
    return label


def check_text(text, at: str, field: str = "text") -> str:
    """A non-empty text."""
    if not isinstance(text, str):
        shown = "null" if text is None else f"{type(text).__name__} {text!r}"
        raise ValueError(f"{at}: {field!r} must be a string, got {shown}")
    if not text.strip():
        raise ValueError(f"{at}: {field!r} is empty")
    return text


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file, with the line number of a malformed one."""
    rows = Records()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(utf8_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            rows.lines.append(n)
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def utf8_lines(f, path: str):
    """The lines of the text file ``f``; bytes that are not UTF-8 raise a ValueError naming
    ``path`` (Python's own message names no file)."""
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason}); expected a text file") from None
