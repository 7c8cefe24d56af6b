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
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastpt._atomic import atomic_write_json, sha256_file, sha256_json

# One exception for every bad checkpoint, model files (fastpt.models) and training state alike.
from fastpt.models.hf import CheckpointError  # noqa: F401  (re-exported)

MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "trainer_state.json", "latest")
DIGEST = "state_sha256"
_TMP = re.compile(r"\.step-\d+\.tmp-(\d+)$")  # a save in progress (or killed): .step-<N>.tmp-<pid>


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


def _rng_names(rank: int) -> tuple[str, str]:
    """The names of process ``rank``'s torch and NumPy RNG tensors in the optimizer file."""
    prefix = "rng." if rank == 0 else f"rng.{rank}."
    return prefix + "torch", prefix + "numpy"


def _check_rng(tensors: dict, meta: dict, file: str, rank: int = 0) -> None:
    """Raise CheckpointError unless the saved RNG states can be restored. They are tried on
    private generators, so a bad state leaves the process's own generators untouched."""
    try:
        version, state, gauss = meta["python"]
        random.Random().setstate((version, tuple(state), gauss))
        np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
        np.random.RandomState().set_state((np_name, tensors["rng.numpy"].numpy().astype(np.uint32),
                                           np_pos, np_has_gauss, np_gauss))
        torch.Generator().set_state(tensors["rng.torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        torch_name, numpy_name = _rng_names(rank)
        field = "rng" if rank == 0 else f"rng.other_ranks[{rank - 1}]"
        where = f"field {field!r} and the tensors {torch_name}, {numpy_name}"
        raise CheckpointError(f"{file}: the RNG state of process {rank} ({where} of {OPTIM_FILE}) "
                              f"cannot be restored ({type(e).__name__}: {e})") from None


def _rng_ranks(tensors: dict, meta: dict, file: str) -> list[tuple[dict, dict]]:
    """Every saved process's RNG state, in rank order, as ``rng_state()`` gave it; each one
    checked to be restorable."""
    metas = [meta, *meta.get("other_ranks", [])]
    expected = [name for rank in range(len(metas)) for name in _rng_names(rank)]
    if sorted(tensors) != sorted(expected):
        raise CheckpointError(f"{file}: the RNG state (field 'rng' and the rng.* tensors of {OPTIM_FILE}) "
                              f"cannot be restored: field 'rng' holds the states of {len(metas)} processes, "
                              f"whose tensors are {_few(expected)}, and {OPTIM_FILE} holds "
                              f"{_few(sorted(tensors))}")
    ranks = []
    for rank, own in enumerate(metas):
        torch_name, numpy_name = _rng_names(rank)
        own_tensors = {"rng.torch": tensors[torch_name], "rng.numpy": tensors[numpy_name]}
        _check_rng(own_tensors, own, file, rank)
        ranks.append((own_tensors, {"python": own["python"], "numpy": own["numpy"]}))
    return ranks


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


def _state_digest(state: dict) -> str:
    """SHA-256 of the state's canonical JSON (sorted keys, no spaces), without the digest itself."""
    return sha256_json({k: v for k, v in state.items() if k != DIGEST})


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


def rng_processes(state: dict) -> int | None:
    """How many processes' RNG states a loaded checkpoint holds; None for one written before
    fastpt saved every process's (it holds process 0's alone, whatever the number of processes)."""
    return len(state["rng_ranks"]) if "other_ranks" in state["rng"] else None


def restore_rng(state: dict, rank: int = 0) -> None:
    """Set this process's Python, NumPy and torch generators to the states process ``rank``
    of the saved run had."""
    set_rng_state(*state["rng_ranks"][rank])
