"""Saving what fine-tuning changed: adapter-only files or a merged full checkpoint.

Adapter-only (``save_adapter``): ``adapter_config.json`` (the ``FinetuneConfig``, the base
model's architecture, and the names of the saved tensors) + ``adapter_model.safetensors``
with every trainable tensor: LoRA factors, adapters, prompts, prefixes, IA3 scales, BitFit
biases and the new task head. ``load_adapter`` applies the same strategy to a fresh base and
loads them, checking that the base matches (architecture and shapes). Merged
(``merge_and_unload`` then ``save_pretrained``) gives a plain model with no adapter code.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastpt.finetune.strategies import FinetuneConfig, backbone_of, prepare

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _base_signature(model) -> dict:
    backbone = backbone_of(getattr(model, "model", model))
    config = getattr(backbone, "config", None)
    return {"class": type(backbone).__name__,
            "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else None}


def save_adapter(model: torch.nn.Module, path: str, config: FinetuneConfig) -> list[str]:
    """Write the trainable tensors of ``model`` (as prepared by ``prepare``); returns their names."""
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("the model has no trainable parameters to save")
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(path, WEIGHTS_FILE))
    meta = {"finetune": config.to_dict(), "base": _base_signature(model), "tensors": sorted(tensors)}
    tmp = os.path.join(path, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, CONFIG_FILE))
    return sorted(tensors)


def load_adapter(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Apply the saved strategy to ``model`` (a fresh base with the same task head class)
    and load the saved tensors; returns the prepared model."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(path, WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path!r} is not a readable fastpt adapter: {e}") from None
    base = _base_signature(model)
    if base != meta["base"]:
        raise ValueError(f"adapter at {path!r} was trained on {meta['base']['class']} with config "
                         f"{meta['base']['config']}, not on this {base['class']} ({base['config']})")
    prepared = prepare(model, FinetuneConfig(**meta["finetune"]))
    params = dict(prepared.named_parameters())
    missing = sorted(set(tensors) - set(params))
    wrong = sorted(n for n in tensors if n in params and params[n].shape != tensors[n].shape)
    if missing or wrong:
        raise ValueError(f"adapter tensors do not fit this model: unknown {missing}, "
                         f"mis-shaped {[(n, tuple(tensors[n].shape), tuple(params[n].shape)) for n in wrong]}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return prepared
