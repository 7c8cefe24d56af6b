"""Hugging Face checkpoint files: config.json, model.safetensors or the shards a
model.safetensors.index.json lists. Only safetensors files are read (never pickle); a file
that is truncated, corrupt, or disagrees with its index raises :class:`CheckpointError`
naming it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fastpt.models.hf_config import from_hf_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
"""A sharded checkpoint: its ``weight_map`` names the shard file of each tensor."""

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the offending tensors or the file."""


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file raises CheckpointError."""
    from safetensors.torch import load_file
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise _unreadable(file, e) from e


def _unreadable(file: Path, e: Exception) -> CheckpointError:
    size = file.stat().st_size if file.exists() else 0
    return CheckpointError(f"{file}: not a readable safetensors file ({size} bytes; truncated "
                           f"or corrupt?): {type(e).__name__}: {e}")


def read_safetensors_header(file: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(shape of each tensor, metadata) of a safetensors file, from its header alone: no
    tensor data is read."""
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}, f.metadata() or {}
    except Exception as e:  # as in read_safetensors
        raise _unreadable(file, e) from e


@dataclass
class WeightFiles:
    """The safetensors file(s) of a folder: model.safetensors, or the shards listed by
    model.safetensors.index.json. ``source`` is the file named in messages."""
    source: Path
    files: list[Path]
    weight_map: dict[str, str] | None = None  # tensor -> shard file name (sharded only)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def headers(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        """(shape of each tensor, metadata), from the headers alone; a sharded checkpoint whose
        index and shards disagree raises CheckpointError naming every tensor concerned."""
        if self.weight_map is None:
            return read_safetensors_header(self.files[0])
        shard_of, shapes, duplicated = {}, {}, []
        for file in self.files:
            for name, shape in read_safetensors_header(file)[0].items():
                if name in shard_of:
                    duplicated.append(f"{name} ({shard_of[name]}, {file.name})")
                shard_of[name], shapes[name] = file.name, shape
        misplaced = [f"{n} (listed in {s}, " + (f"found in {shard_of[n]})" if n in shard_of else "absent)")
                     for n, s in self.weight_map.items() if shard_of.get(n) != s]
        unlisted = [f"{n} ({s})" for n, s in shard_of.items() if n not in self.weight_map]
        problems = [(f"tensors listed in the index but not in their shard ({len(misplaced)})", misplaced),
                    (f"tensors in more than one shard ({len(duplicated)})", duplicated),
                    (f"tensors in a shard but not in the index ({len(unlisted)})", unlisted)]
        lines = [f"  {what}: {', '.join(names)}" for what, names in problems if names]
        if lines:
            raise CheckpointError("\n".join([f"{self.source} and its shards disagree:", *lines]))
        return shapes, {}  # fastpt writes no shards: no fastpt metadata to read

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for file in self.files:
            out.update(read_safetensors(file))
        return out


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index (tensor name -> shard file name)."""
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not valid JSON: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError(f"{index}: expected a JSON object with a non-empty \"weight_map\" of tensor name "
                              f"-> shard file name, got {str(data)[:200]}")
    # A shard is a file of this folder: "../x" or "/x" would read files elsewhere.
    outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in its folder, got {outside}")
    return weight_map


def weight_files(path: Path) -> WeightFiles:
    weights, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if weights.is_file():  # preferred where both are present, as transformers does
        return WeightFiles(weights, [weights])
    if index.is_file():
        weight_map = read_index(index)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files not found ({len(missing)}): {', '.join(missing)}")
        return WeightFiles(index, [path / s for s in shards], weight_map)
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" ({', '.join(pickles)} not read: fastpt loads safetensors only, never pickle)" if pickles else ""
    raise FileNotFoundError(f"{weights} (or a sharded {INDEX_NAME}) not found{hint}")


def as_weight_dtype(dtype) -> torch.dtype | None:
    """``dtype`` for from_pretrained: None (the file's, as float32), a floating-point
    torch.dtype, or its name ("bfloat16", as transformers accepts)."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else dtype
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        raise TypeError(f"from_pretrained: dtype must be None or one of {names} (a torch.dtype or its "
                        f"name), got {dtype!r}")
    return dtype


def read_config(config_file: Path):
    try:
        hf_config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{config_file}: not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError; also over-long ints, deep nesting
        raise CheckpointError(f"{config_file}: not valid JSON: {e}") from e
    try:
        return from_hf_config(hf_config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
