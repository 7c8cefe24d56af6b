"""Training checkpoints: model, optimizer, scheduler, RNG and data position, written atomically.

Layout of ``<dir>/step-<N>/``: ``model.safetensors`` (safetensors' ``save_model``, so tied
weights are stored once), ``optimizer.safetensors`` (every tensor of the optimizer state),
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
from safetensors.torch import load_file, load_model, save_file, save_model

MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "trainer_state.json", "latest")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or does not match the model."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _optimizer_split(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: str, step: int, model, optimizer, scheduler, data_state: dict,
                    extra: dict | None = None, keep_last: int = 2,
                    tensors: dict | None = None) -> str:
    """Write ``root/step-<step>`` atomically and point ``root/latest`` at it; returns the path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, MODEL_FILE))
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    rng_tensors, rng_meta = rng_state()
    extra_tensors = {f"extra.{k}": v for k, v in (tensors or {}).items()}
    save_file({**opt_tensors, **rng_tensors, **extra_tensors}, os.path.join(tmp, OPTIM_FILE))
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                    "sha256": _sha256(os.path.join(tmp, name))} for name in (MODEL_FILE, OPTIM_FILE)}
    state = {"step": step, "data": data_state, "optimizer": opt_meta, "rng": rng_meta,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "extra": extra or {}, "files": files}
    _write_json_atomic(os.path.join(tmp, STATE_FILE), state)
    if os.path.exists(final):  # re-saving a step: move the old one aside, never half-replace
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    _write_json_atomic(os.path.join(root, LATEST), {"step": step, "path": f"step-{step}"})
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


def load_checkpoint(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Verify and load a checkpoint into ``model`` (and optimizer/scheduler/RNG when given).
    Returns the trainer state (step, data position, extra, and the extra ``tensors``)."""
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
        missing, unexpected = load_model(model, os.path.join(folder, MODEL_FILE), strict=False)
        tensors = load_file(os.path.join(folder, OPTIM_FILE))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {folder}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{folder}/{MODEL_FILE} does not match the model: "
                              f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if optimizer is not None:
        opt = {k: v for k, v in tensors.items() if k.startswith("state.")}
        optimizer.load_state_dict(_optimizer_join(opt, state["optimizer"]))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if optimizer is not None:
        set_rng_state(tensors, state["rng"])
    state["tensors"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state
