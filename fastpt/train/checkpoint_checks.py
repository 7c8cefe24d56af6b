"""A checkpoint's file names, and the checks of what it holds: trainer_state.json, JSON-able states, tensors."""

from __future__ import annotations

import json
import os

import torch

from fastpt._atomic import sha256_json
from fastpt.models.hf import CheckpointError

MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "trainer_state.json", "latest")
DIGEST = "state_sha256"


def _check_json(name: str, value) -> None:
    """TypeError naming the entry of ``value`` that JSON cannot hold, before anything is
    written: json's "Object of type X is not JSON serializable" came after the weights were
    written and named neither the argument nor the entry."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        where = name
        if isinstance(value, dict):
            for key, item in value.items():
                try:
                    json.dumps(item)
                except (TypeError, ValueError):
                    where = f"{name}[{key!r}]"
                    break
        raise TypeError(f"save_checkpoint: {where} cannot be written as JSON ({e})") from None


def _state_digest(state: dict) -> str:
    """SHA-256 of the state's canonical JSON (sorted keys, no spaces), without the digest itself."""
    return sha256_json({k: v for k, v in state.items() if k != DIGEST})


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_state(state, file: str) -> None:
    """Raise CheckpointError naming the field unless ``state`` (read from ``file``) is unaltered
    and has the structure save_checkpoint writes, so that nothing later fails on it bare."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a JSON {type(state).__name__}, not an object")
    if DIGEST not in state:
        raise CheckpointError(f"{file} has no {DIGEST!r} (written by an older fastpt, or edited): "
                              "its step, data position and optimizer settings cannot be verified")
    if state[DIGEST] != _state_digest(state):
        raise CheckpointError(f"{file} was altered: its content does not match its {DIGEST}")

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{file}: field {field!r} {what}")

    need(_count(state.get("step")), "step", "must be an integer >= 0")
    data = state.get("data")
    need(isinstance(data, dict) and _count(data.get("epoch")) and _count(data.get("batches_in_epoch")),
         "data", "must hold integers 'epoch' and 'batches_in_epoch' >= 0")
    ranks = data.get("ranks")  # every process's own position (absent in older checkpoints)
    need(ranks is None or (isinstance(ranks, list) and len(ranks) > 0
                           and all(isinstance(r, list) and len(r) == 2 and all(map(_count, r)) for r in ranks)),
         "data.ranks", "must list one [epoch, batches_in_epoch] pair of integers >= 0 per process")
    opt = state.get("optimizer")
    need(isinstance(opt, dict) and isinstance(opt.get("scalars"), dict), "optimizer", "must hold 'scalars'")
    groups = opt.get("param_groups")
    need(isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                          for g in groups),
         "optimizer.param_groups", "must be a list of groups, each with its 'params'")
    need(isinstance(state.get("rng"), dict), "rng", "must be an object")
    others = state["rng"].get("other_ranks", [])  # absent in older checkpoints
    need(isinstance(others, list) and all(isinstance(o, dict) for o in others), "rng.other_ranks",
         "must list one object per process after the first")
    need(state.get("scheduler") is None or isinstance(state["scheduler"], dict), "scheduler",
         "must be an object or null")
    aliases = state.get("aliases")
    need(isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values()),
         "aliases", "must map names to names")
    need(isinstance(state.get("extra"), dict), "extra", "must be an object")
    files = state.get("files")
    need(isinstance(files, dict) and set(files) == {MODEL_FILE, OPTIM_FILE}
         and all(isinstance(e, dict) and _count(e.get("bytes")) and isinstance(e.get("sha256"), str)
                 for e in files.values()),
         "files", f"must give 'bytes' and 'sha256' of exactly {MODEL_FILE} and {OPTIM_FILE}")


def _few(names: list) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"


def check_against(state: dict, model: torch.nn.Module) -> None:
    """Raise CheckpointError unless a loaded checkpoint fits ``model``: the same tensor names
    (tied names included), shapes and dtypes; finite parameters; optimizer state only for the
    model's parameters, with their shapes and dtypes and finite values. torch's loader alone
    checks less: it fills names missing from the checkpoint with the model's current tensors,
    casts dtypes silently, and takes optimizer state of any shape (failing later, at step)."""
    model_file, optim_file = os.path.join(state["folder"], MODEL_FILE), os.path.join(state["folder"], OPTIM_FILE)
    reference, weights = model.state_dict(), state["model"]
    missing, unexpected = sorted(reference.keys() - weights.keys()), sorted(weights.keys() - reference.keys())
    if missing or unexpected:
        raise CheckpointError(f"{model_file} does not match this model: missing {_few(missing)}; "
                              f"unexpected {_few(unexpected)}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, want in reference.items():
        got = weights[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{model_file} does not match this model: {name} is {got.dtype} "
                                  f"{tuple(got.shape)}, the model's is {want.dtype} {tuple(want.shape)}")
        # Only parameters: a buffer may hold infinities on purpose (an attention mask, say).
        if name in params and got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"{model_file}: {name} holds NaN or infinite values")
    for param, entries in state["optimizer"]["state"].items():
        if param not in params:
            raise CheckpointError(f"{optim_file} holds optimizer state for {param!r}, no parameter of this model")
        p = params[param]
        for key, value in entries.items():
            if not torch.is_tensor(value):
                continue
            # Per-element state (Adam's moments) has the parameter's shape; 0-d entries are counters.
            if value.dim() and (value.shape != p.shape or value.dtype != p.dtype):
                raise CheckpointError(f"{optim_file}: state/{param}/{key} is {value.dtype} {tuple(value.shape)}, "
                                      f"the parameter is {p.dtype} {tuple(p.shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise CheckpointError(f"{optim_file}: state/{param}/{key} holds NaN or infinite values")
