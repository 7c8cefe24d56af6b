"""Training checkpoints: model, optimizer, scheduler, RNG and data position, written atomically.

Layout of ``<dir>/step-<N>/``: ``model.safetensors`` (full weights; tied weights stored once,
their other names recorded as aliases), ``optimizer.safetensors`` (every tensor of the optimizer state),
``trainer_state.json`` (step, each process's data position, scheduler, each process's RNG
states, optimizer hyper-parameters, and the size + SHA-256 of both tensor files). The RNG states
(Python, NumPy, torch CPU) of process 0 are field ``rng``'s ``python`` and ``numpy`` with the
tensors ``rng.torch`` and ``rng.numpy``; those of process r >= 1 are ``rng.other_ranks[r - 1]``
with ``rng.<r>.torch`` and ``rng.<r>.numpy`` (a checkpoint without ``other_ranks``, written
before fastpt saved every process's, holds process 0's alone). A checkpoint is written into a
temporary folder and renamed into place, then ``<dir>/latest`` is replaced, so a crash
mid-save leaves the previous checkpoint as the latest. Loading verifies sizes and hashes first: a truncated or
corrupted file raises ``CheckpointError`` naming it. ``trainer_state.json`` carries the SHA-256
of its own canonical JSON (``state_sha256``), so an edited number is caught too; a state file
without it (written before fastpt checked it) is refused. These hashes catch corruption and
accidental edits, not a deliberate forgery (anyone can recompute them). No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastpt._atomic import atomic_write_json, give_default_mode, sha256_file

# One exception for every bad checkpoint, model files (fastpt.models) and training state alike.
from fastpt.models.hf import CheckpointError  # noqa: F401  (re-exported)
from fastpt.train.checkpoint_checks import (  # noqa: F401  (check_against and the names re-exported)
    DIGEST, LATEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, _check_json, _check_state, _count, _state_digest,
    check_against)
from fastpt.train.checkpoint_rng import (  # noqa: F401  (the RNG functions re-exported)
    _rng_names, _rng_ranks, restore_rng, rng_processes, rng_state, set_rng_state)

_TMP = re.compile(r"\.step-\d+\.tmp-(\d+)$")  # a save in progress (or killed): .step-<N>.tmp-<pid>


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


def _optimizer_join(tensors: dict, meta: dict, folder: str) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or not all(parts):
            raise CheckpointError(f"{folder}/{OPTIM_FILE}: tensor {key!r} is not 'state/<parameter>/<name>'")
        state.setdefault(parts[1], {})[parts[2]] = value
    for key, value in meta["scalars"].items():
        parts = key.split("/")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{folder}/{STATE_FILE}: field 'optimizer.scalars' has key {key!r}, "
                                  "not '<parameter>/<name>'")
        state.setdefault(parts[0], {})[parts[1]] = value
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
                    keep_last: int = 2, tensors: dict | None = None,
                    rng_states: list | None = None) -> str:
    """Write ``root/step-<step>`` atomically and point ``root/latest`` at it; returns the path.

    ``model_state`` / ``optimizer_state`` are full (unsharded) state dicts, the optimizer's
    keyed by parameter name (``torch.distributed.checkpoint.state_dict`` gives both for plain,
    DDP and FSDP models alike). ``rng_states``: every process's :func:`rng_state`, in rank
    order (the Trainer gathers them); by default this process's alone.

    Raises ValueError for a ``step`` or ``keep_last`` that is not an int >= 0, and, before
    anything is published, for states that load_checkpoint would refuse: such a checkpoint
    became ``latest`` and pruning removed the loadable ones. A failed save leaves no
    temporary folder behind."""
    for name, value in (("step", step), ("keep_last", keep_last)):
        if not _count(value):  # step True was saved as step-True, -1 as step--1: unloadable
            raise ValueError(f"save_checkpoint: {name} must be an int >= 0, got {value!r}")
    for name, value in (("scheduler_state", scheduler_state), ("data_state", data_state), ("extra", extra)):
        _check_json(name, value)
    os.makedirs(root, exist_ok=True)
    _remove_stale_temps(root)
    _recover_interrupted_resaves(root)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_step(tmp, step, model_state, optimizer_state, scheduler_state, data_state, extra, tensors,
                    rng_states)
    except BaseException:
        # Only this process's own temporary folders are kept by _remove_stale_temps (they may be
        # saves in progress): one of a failed save (disk full, an unserializable value) stays forever.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # re-saving a step: move the old one aside, never half-replace
        shutil.rmtree(final + ".old", ignore_errors=True)
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)
    _fsync(root)
    atomic_write_json(os.path.join(root, LATEST), {"step": step, "path": f"step-{step}"})
    _prune(root, keep_last, step)
    return final


def _write_step(tmp: str, step: int, model_state: dict, optimizer_state: dict, scheduler_state,
                data_state: dict, extra, tensors, rng_states) -> None:
    """The files of one checkpoint, into the temporary folder ``tmp``."""
    weights, aliases = _dedup(model_state)
    save_file(weights, os.path.join(tmp, MODEL_FILE))
    opt_tensors, opt_meta = _optimizer_split(optimizer_state)
    rng_states = list(rng_states) if rng_states is not None else [rng_state()]
    if not rng_states:
        raise ValueError("rng_states must hold one process's RNG state at least")
    rng_tensors = {}
    for rank, (own, _) in enumerate(rng_states):
        torch_name, numpy_name = _rng_names(rank)
        # Copies: safetensors refuses tensors sharing memory (one state given for two ranks).
        rng_tensors[torch_name], rng_tensors[numpy_name] = own["rng.torch"].clone(), own["rng.numpy"].clone()
    rng_meta = {**rng_states[0][1], "other_ranks": [meta for _, meta in rng_states[1:]]}
    extra_tensors = {f"extra/{k}": v for k, v in (tensors or {}).items()}
    save_file({**opt_tensors, **rng_tensors, **extra_tensors}, os.path.join(tmp, OPTIM_FILE))
    for name in (MODEL_FILE, OPTIM_FILE):  # on disk before the rename publishes them (and pruning follows)
        give_default_mode(os.path.join(tmp, name))
        _fsync(os.path.join(tmp, name))
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                    "sha256": sha256_file(os.path.join(tmp, name))} for name in (MODEL_FILE, OPTIM_FILE)}
    state = {"step": step, "data": data_state, "optimizer": opt_meta, "rng": rng_meta,
             "scheduler": scheduler_state, "aliases": aliases, "extra": extra or {}, "files": files}
    # Hashed as it will read back (tuples become lists, keys strings), so load sees the same digest.
    state = json.loads(json.dumps(state))
    state[DIGEST] = _state_digest(state)
    # What load_checkpoint would refuse (a data position without epoch, say) is refused here,
    # before it is published as latest and pruning removes the loadable checkpoints.
    _check_state(state, os.path.join(tmp, STATE_FILE))
    atomic_write_json(os.path.join(tmp, STATE_FILE), state)
    _fsync(tmp)


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries (its renames), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
        # Some filesystems cannot fsync a folder; the renames are then as durable as they make them.
    finally:
        os.close(fd)


def _prune(root: str, keep_last: int, written: int) -> None:
    """Keep the checkpoint just written (``latest`` points at it) and the ``keep_last - 1``
    highest other steps. The one just written may not be the highest: a run resumed from an
    older step writes below the ones it abandoned."""
    if keep_last <= 0:
        return
    steps = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("step-") and d[5:].isdigit())
    others = [s for s in steps if s != written]
    for s in others[:max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(os.path.join(root, f"step-{s}"), ignore_errors=True)


def _remove_stale_temps(root: str) -> None:
    """Remove ``.step-N.tmp-<pid>`` folders of saves killed mid-way: those whose process is
    gone. A folder whose pid is alive (another process saving, or a reused pid) is left alone."""
    for name in os.listdir(root):
        match = _TMP.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _recover_interrupted_resaves(root: str) -> None:
    """A re-save of step N moves ``step-N`` to ``step-N.old`` just before renaming the new one
    into place; a save killed between the two renames leaves only ``step-N.old``, which
    ``latest`` may still name (as ``step-N``). Move it back; drop it where ``step-N`` exists."""
    for name in os.listdir(root):
        if not (name.startswith("step-") and name.endswith(".old") and name[5:-4].isdigit()):
            continue
        old, final = os.path.join(root, name), os.path.join(root, name[:-4])
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # someone else's process; an absurd pid is not ours to judge
        return True
    return True


def resolve(path: str) -> str:
    """A step folder, or a checkpoint root (then its ``latest``)."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        try:
            with open(latest) as f:
                target = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{latest} is corrupted ({e})") from None
        step_dir = target.get("path") if isinstance(target, dict) else None
        if not isinstance(step_dir, str) or not step_dir:
            raise CheckpointError(f"{latest} is corrupted: field 'path' must name a step folder, got {target!r}")
        # latest names a folder inside the root; an absolute path or '..' would resume some other run.
        norm = os.path.normpath(step_dir)
        if os.path.isabs(step_dir) or norm in (".", os.pardir) or norm.startswith(os.pardir + os.sep):
            raise CheckpointError(f"{latest}: field 'path' {step_dir!r} leaves the checkpoint folder {path}")
        if not os.path.exists(os.path.join(path, norm)):
            _recover_interrupted_resaves(path)
        return os.path.join(path, norm)
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    raise CheckpointError(f"no checkpoint at {path!r} (neither a 'latest' file nor {STATE_FILE})")


def load_checkpoint(path: str) -> dict:
    """Verify a checkpoint (sizes, SHA-256) and read it: returns the trainer state with
    ``model`` (full state dict, tied names restored), ``optimizer`` (full, keyed by parameter
    name), ``scheduler``, ``step``, ``data``, ``extra``, extra ``tensors`` and ``rng_ranks``
    (every saved process's RNG state). Restores the Python/NumPy/torch RNGs only through
    ``restore_rng(state, rank)``. Whether the tensors fit a given model is checked by
    :func:`check_against`."""
    folder = resolve(path)
    state_file = os.path.join(folder, STATE_FILE)
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_file} is missing or corrupted ({e})") from None
    _check_state(state, state_file)
    for name, expect in state["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing")
        size = os.path.getsize(file)
        if size != expect["bytes"]:
            raise CheckpointError(f"{file} is truncated or altered: {size} bytes, expected {expect['bytes']}")
        if sha256_file(file) != expect["sha256"]:
            raise CheckpointError(f"{file} is corrupted: SHA-256 does not match the one recorded")
    try:
        weights = load_file(os.path.join(folder, MODEL_FILE))
        tensors = load_file(os.path.join(folder, OPTIM_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder}: {e}") from None
    for name, target in state["aliases"].items():
        if target not in weights:
            raise CheckpointError(f"{state_file}: field 'aliases' maps {name!r} to {target!r}, "
                                  f"which {MODEL_FILE} does not hold")
        if name in weights:
            raise CheckpointError(f"{state_file}: field 'aliases' maps {name!r}, which {MODEL_FILE} "
                                  "also stores: one of the two would be dropped")
        weights[name] = weights[target]
    state["model"] = weights
    state["optimizer"] = _optimizer_join(
        {k: v for k, v in tensors.items() if k.startswith("state/")}, state["optimizer"], folder)
    state["rng_ranks"] = _rng_ranks({k: v for k, v in tensors.items() if k.startswith("rng.")},
                                    state["rng"], state_file)
    state["tensors"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
    state["folder"] = folder
    return state
