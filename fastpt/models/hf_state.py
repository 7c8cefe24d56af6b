"""HF-named state dicts: a model's tensors under HF names, and their checked copy into a model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fastpt.models.hf_files import WEIGHT_DTYPES, CheckpointError
from fastpt.models.hf_names import _IGNORED, _aliases, _entries


def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's tensors under HF names (tied copies not repeated), detached."""
    ours = model.state_dict()
    with torch.no_grad():
        return {e.hf: e.pack(*(ours[n] for n in e.ours)).detach() for e in _entries(model.config)}


def load_hf_state_dict(model, tensors: dict[str, Tensor], *, allow_missing: Callable[[str], bool] | None = None,
                       source: str = "checkpoint") -> list[str]:
    """Copy HF-named ``tensors`` into ``model`` after checking names and shapes.

    Raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor
    (tied copies under their alias names are accepted, if equal to the tensor they copy).
    ``allow_missing(name)`` marks tensors that may be absent (they keep their initial
    values); returns those names. Meta tensors (``model`` on the meta device too) check
    names and shapes only, without reading or allocating any data."""
    entries = _entries(model.config)
    aliases = _aliases(model.config)
    tensors = dict(tensors)
    untied = []  # the model has one tensor for both names: keeping either would drop the other
    for alias, canonical in aliases.items():
        if alias in tensors:
            value = tensors.pop(alias)
            if canonical not in tensors:
                tensors[canonical] = value
            elif not _identical(value, tensors[canonical]):
                untied.append(f"{alias} ({value.dtype}, {list(value.shape)}) differs from {canonical} "
                              f"({tensors[canonical].dtype}, {list(tensors[canonical].shape)})")
    expected = {e.hf: e for e in entries}
    current = model.state_dict()
    missing = [n for n in expected if n not in tensors and not (allow_missing and allow_missing(n))]
    skipped = [n for n in expected if n not in tensors and n not in missing]
    unexpected = [n for n in tensors if n not in expected and not any(p.search(n) for p in _IGNORED)]
    shapes = {}
    for name, e in expected.items():
        if name in tensors:
            want = tuple(e.pack(*(current[n] for n in e.ours)).shape)
            if tuple(tensors[name].shape) != want:
                shapes[name] = (tuple(tensors[name].shape), want)
    # Weights are floats (an integer tensor would be cast into garbage) and finite (NaN or
    # inf weights make every output NaN, far from the file that caused it). float8 weights
    # come with scale tensors fastpt does not read: copied as they are they would be wrong.
    not_float = [f"{n} ({t.dtype})" for n, t in tensors.items() if n in expected and not t.is_floating_point()]
    float8 = [f"{n} ({t.dtype})" for n, t in tensors.items()
              if n in expected and t.is_floating_point() and t.dtype not in WEIGHT_DTYPES]
    not_finite = [n for n, t in tensors.items() if n in expected and t.dtype in WEIGHT_DTYPES
                  and not t.is_meta and not torch.isfinite(t).all()]
    overflow = _out_of_range(tensors, {n: current[e.ours[0]].dtype for n, e in expected.items()}, not_finite)
    if missing or unexpected or shapes or not_float or float8 or not_finite or overflow or untied:
        lines = [f"{source} does not fit {type(model).__name__} ({model.config.model_type}):"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        for name, (got, want) in shapes.items():
            lines.append(f"  mis-shaped tensor {name}: file has {list(got)}, model expects {list(want)}")
        if not_float:
            lines.append(f"  not floating-point ({len(not_float)}): {', '.join(not_float)}")
        if float8:
            lines.append(f"  unsupported floating-point dtype ({len(float8)}; fastpt reads float16, bfloat16, "
                         f"float32 and float64): {', '.join(float8)}")
        if not_finite:
            lines.append(f"  NaN or infinite values ({len(not_finite)}): {', '.join(not_finite)}")
        if overflow:
            lines.append(f"  values too large for the model's dtype, they would become inf ({len(overflow)}; "
                         f"load with a wider dtype): {', '.join(overflow)}")
        for text in untied:
            lines.append(f"  tied tensors differ (the model shares one tensor for both; "
                         f"tie_word_embeddings in the config?): {text}")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for name, e in expected.items():
            if name in tensors:
                for our, value in zip(e.ours, e.unpack(tensors[name])):
                    current[our].copy_(value)
    return skipped


def _out_of_range(tensors: dict[str, Tensor], dtypes: dict[str, torch.dtype], skip: list[str]) -> list[str]:
    """The tensors (of those named in ``dtypes``, less ``skip``) holding finite values that the
    copy into the model's dtype ``dtypes[name]`` would turn into inf: a float64 file's 1e300
    in a float32 model, a float32 file's 1e5 in a float16 one. Such a model is as wrong as
    one with NaN weights, and nothing would say why."""
    out = []
    for name, t in tensors.items():
        want = dtypes.get(name)
        if (want is None or name in skip or t.is_meta or t.dtype not in WEIGHT_DTYPES
                or want not in WEIGHT_DTYPES or torch.finfo(t.dtype).max <= torch.finfo(want).max):
            continue
        # Rounding is monotone: some value becomes inf exactly when the extremes do (no
        # full-size converted copy of every tensor).
        lo, hi = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        if not bool(torch.isfinite(torch.stack([lo, hi]).to(want)).all()):
            out.append(f"{name} (max |value| {max(-float(lo), float(hi)):.3g} > {torch.finfo(want).max:.3g}, "
                       f"the largest {str(want).removeprefix('torch.')})")
    return out


def _identical(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of a file are one tied tensor saved twice: same dtype, shape and
    bytes (NaN-safe, and defined for every dtype). Meta tensors: same shape."""
    if a.is_meta or b.is_meta:
        return a.shape == b.shape
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
