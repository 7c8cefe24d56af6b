"""Saving what fine-tuning changed: adapter-only files or a merged full checkpoint.

Adapter-only (``save_adapter``): ``adapter_config.json`` (the ``FinetuneConfig``, the base
model's architecture, and the names of the saved tensors) + ``adapter_model.safetensors``
with every trainable tensor: LoRA factors, adapters, prompts, prefixes, IA3 scales, BitFit
biases and the new task head. ``load_adapter`` applies the same strategy to a fresh base and
loads them, checking that the base matches (architecture and shapes). Merged
(``save_merged`` / ``load_merged``): LoRA and IA3 folded into the weights, a plain HF-layout
model plus the task head's tensors, no adapter code needed to load it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastpt._atomic import atomic_write, atomic_write_json
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
    atomic_write(os.path.join(path, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp))
    meta = {"finetune": config.to_dict(), "base": _base_signature(model), "tensors": sorted(tensors)}
    atomic_write_json(os.path.join(path, CONFIG_FILE), meta)
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


_HEADS = {}


def _head_classes() -> dict:
    if not _HEADS:
        from fastpt.finetune.heads import QuestionAnswering, SequenceClassifier, TokenClassifier
        _HEADS.update({c.__name__: c for c in (SequenceClassifier, TokenClassifier, QuestionAnswering)})
    return _HEADS


def _fold_ia3(backbone: torch.nn.Module) -> None:
    """Fold IA3 scales into the weights they scale: output scales into rows (and bias),
    input scales into columns; the IA3 wrappers become their plain linears."""
    from fastpt.finetune.peft_modules import IA3Linear
    for path, m in [(n, m) for n, m in backbone.named_modules() if isinstance(m, IA3Linear)]:
        with torch.no_grad():
            if m.on == "output":
                m.base.weight.mul_(m.ia3_l.unsqueeze(1))
                if m.base.bias is not None:
                    m.base.bias.mul_(m.ia3_l)
            else:
                m.base.weight.mul_(m.ia3_l.unsqueeze(0))
        parent, _, leaf = path.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, leaf, m.base)


def save_merged(model: torch.nn.Module, path: str) -> None:
    """Merged full checkpoint: LoRA and IA3 folded into the weights, written as a plain HF
    layout model (``save_pretrained``) plus, for a task head, ``head.safetensors`` and
    ``head_config.json``. Strategies that add modules with no weight to fold into (adapters,
    prefix, prompt) raise ``ValueError``: save them with ``save_adapter``."""
    from fastpt.finetune.lora import merge_and_unload
    from fastpt.finetune.peft_modules import WithAdapter
    from fastpt.finetune.prefix import PrefixAttention
    from fastpt.finetune.strategies import PromptTuned
    if isinstance(model, PromptTuned):
        raise ValueError("prompt tuning has no weights to merge into; use save_adapter")
    backbone = backbone_of(model)
    if any(isinstance(m, (WithAdapter, PrefixAttention)) for m in backbone.modules()):
        raise ValueError("adapters and prefix tuning add modules that cannot be merged; use save_adapter")
    merge_and_unload(backbone)
    _fold_ia3(backbone)
    backbone.save_pretrained(path)
    if backbone is model:
        return
    head = {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    atomic_write(os.path.join(path, "head.safetensors"), lambda tmp: save_file(head, tmp))
    meta = {"class": type(model).__name__, "num_labels": getattr(model, "num_labels", None),
            "pooling": getattr(model, "pooling", None), "layer": model.layer}
    atomic_write_json(os.path.join(path, "head_config.json"), meta)


def load_merged(path: str) -> torch.nn.Module:
    """A model written by ``save_merged``: the plain backbone, under its head if it had one."""
    from fastpt.models import from_pretrained
    backbone = from_pretrained(path)
    meta_file = os.path.join(path, "head_config.json")
    if not os.path.isfile(meta_file):
        return backbone
    with open(meta_file) as f:
        meta = json.load(f)
    cls = _head_classes().get(meta["class"])
    if cls is None:
        raise ValueError(f"{path}: unknown head class {meta['class']!r}")
    kwargs = {"layer": meta["layer"]}
    if meta["class"] == "SequenceClassifier":
        kwargs["pooling"] = meta["pooling"]
    args = (backbone,) if meta["class"] == "QuestionAnswering" else (backbone, meta["num_labels"])
    model = cls(*args, **kwargs)
    tensors = load_file(os.path.join(path, "head.safetensors"))
    params = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
    if set(tensors) != set(params):
        raise ValueError(f"{path}/head.safetensors holds {sorted(tensors)}, the head needs {sorted(params)}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model
