"""Training checkpoints: model, optimizer, scheduler, RNG and data position, written atomically.

Layout of ``<dir>/step-<N>/``: ``model.safetensors`` (full weights; tied weights stored once,
their other names recorded as aliases), ``optimizer.safetensors`` (every tensor of the optimizer state),
``trainer_state.json`` (step, data position, scheduler, RNG states, optimizer hyper-parameters,
and the size + SHA-256 of both tensor files). A checkpoint is written into a temporary folder
and renamed into place, then ``<dir>/latest`` is replaced, so a crash mid-save leaves the
previous checkpoint as the latest. Loading verifies sizes and hashes first: a truncated or
corrupted file raises ``CheckpointError`` naming it. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastpt._atomic import atomic_write_json

# One exception for every bad checkpoint, model files (fastpt.models) and training state alike.
from fastpt.models.hf import CheckpointError  # noqa: F401  (re-exported)

MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "trainer_state.json", "latest")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) capturing the Python, NumPy and torch generators."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_keys.astype(np.int64))}
    meta = {"python": [version, list(state), gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos,
                         np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])


def _optimizer_split(sd: dict) -> tuple[dict, dict]:
    """Optimizer state (keyed by parameter name) -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state/{param}/{name}"] = value.contiguous()
            else:
                scalars[f"{param}/{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, param, name = key.split("/")
        state.setdefault(param, {})[name] = value
    for key, value in meta["scalars"].items():
        param, name = key.split("/")
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _dedup(model_state: dict) -> tuple[dict, dict]:
    """Tied weights (one storage, several names) are stored once: (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model_state.items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.contiguous()
    return tensors, aliases


def save_checkpoint(root: str, step: int, model_state: dict, optimizer_state: dict,
                    scheduler_state: dict | None, data_state: dict, extra: dict | None = None,
                    keep_last: int = 2, tensors: dict | None = None) -> str:
    """Write ``root/step-<step>`` atomically and point ``root/latest`` at it; returns the path.

    ``model_state`` / ``optimizer_state`` are full (unsharded) state dicts, the optimizer's
    keyed by parameter name (``torch.distributed.checkpoint.state_dict`` gives both for plain,
    DDP and FSDP models alike)."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights, aliases = _dedup(model_state)
    save_file(weights, os.path.join(tmp, MODEL_FILE))
    opt_tensors, opt_meta = _optimizer_split(optimizer_state)
    rng_tensors, rng_meta = rng_state()
    extra_tensors = {f"extra/{k}": v for k, v in (tensors or {}).items()}
    save_file({**opt_tensors, **rng_tensors, **extra_tensors}, os.path.join(tmp, OPTIM_FILE))
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                    "sha256": _sha256(os.path.join(tmp, name))} for name in (MODEL_FILE, OPTIM_FILE)}
    state = {"step": step, "data": data_state, "optimizer": opt_meta, "rng": rng_meta,
             "scheduler": scheduler_state, "aliases": aliases, "extra": extra or {}, "files": files}
    atomic_write_json(os.path.join(tmp, STATE_FILE), state)
    if os.path.exists(final):  # re-saving a step: move the old one aside, never half-replace
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    atomic_write_json(os.path.join(root, LATEST), {"step": step, "path": f"step-{step}"})
    _prune(root, keep_last)
    return final


def _prune(root: str, keep_last: int) -> None:
    steps = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit())
    for s in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, f"step-{s}"), ignore_errors=True)


def resolve(path: str) -> str:
    """A step folder, or a checkpoint root (then its ``latest``)."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        try:
            with open(latest) as f:
                return os.path.join(path, json.load(f)["path"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{latest} is corrupted ({e})") from None
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    raise CheckpointError(f"no checkpoint at {path!r} (neither a 'latest' file nor {STATE_FILE})")


def load_checkpoint(path: str) -> dict:
    """Verify a checkpoint (sizes, SHA-256) and read it: returns the trainer state with
    ``model`` (full state dict, tied names restored), ``optimizer`` (full, keyed by parameter
    name), ``scheduler``, ``step``, ``data``, ``extra`` and extra ``tensors``. Restores the
    Python/NumPy/torch RNGs only through ``restore_rng(state)``."""
    folder = resolve(path)
    try:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/{STATE_FILE} is missing or corrupted ({e})") from None
    for name, expect in state.get("files", {}).items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing")
        size = os.path.getsize(file)
        if size != expect["bytes"]:
            raise CheckpointError(f"{file} is truncated or altered: {size} bytes, expected {expect['bytes']}")
        if _sha256(file) != expect["sha256"]:
            raise CheckpointError(f"{file} is corrupted: SHA-256 does not match the one recorded")
    try:
        weights = load_file(os.path.join(folder, MODEL_FILE))
        tensors = load_file(os.path.join(folder, OPTIM_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder}: {e}") from None
    for name, target in state["aliases"].items():
        weights[name] = weights[target]
    state["model"] = weights
    state["optimizer"] = _optimizer_join(
        {k: v for k, v in tensors.items() if k.startswith("state/")}, state["optimizer"])
    state["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    state["tensors"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
    state["folder"] = folder
    return state


def restore_rng(state: dict) -> None:
    set_rng_state(state["rng_tensors"], state["rng"])
