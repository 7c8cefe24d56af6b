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
    if not (isinstance(meta, dict) and isinstance(meta.get("finetune"), dict) and isinstance(meta.get("base"), dict)):
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r} is not a fastpt adapter config: it needs the "
                         f"objects 'finetune' and 'base' (what save_adapter writes)")
    base = _base_signature(model)
    if base != meta["base"]:
        raise ValueError(f"adapter at {path!r} was trained on {meta['base'].get('class')} with config "
                         f"{meta['base'].get('config')}, not on this {base['class']} ({base['config']})")
    try:
        config = FinetuneConfig(**meta["finetune"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r} has invalid fine-tuning settings: {e}") from None
    prepared = prepare(model, config)
    _freeze_saved_prefixes(prepared, tensors)
    params = dict(prepared.named_parameters())
    _check_saved_tensors(os.path.join(path, WEIGHTS_FILE), tensors,
                         {n: p for n, p in params.items() if p.requires_grad}, params)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return prepared


def _freeze_saved_prefixes(model: torch.nn.Module, tensors: dict) -> None:
    # A prefix saved after PrefixTuning.freeze() (its MLP dropped after training, as the paper
    # does) holds the computed prefix itself: load it into a frozen prefix module.
    from fastpt.finetune.prefix import PrefixTuning
    for name, module in model.named_modules():
        if isinstance(module, PrefixTuning) and module.prefix is None and f"{name}.prefix" in tensors:
            module.freeze()


def _check_saved_tensors(file: str, tensors: dict, required: dict, params: dict) -> None:
    # Every tensor must land on a parameter of the same shape, every required parameter (what
    # the strategy trains) must be in the file (one left at its init would be a silently
    # different model), and the values must be finite floats.
    unknown = sorted(set(tensors) - set(params))
    absent = sorted(set(required) - set(tensors))
    wrong = sorted(n for n in tensors if n in params and params[n].shape != tensors[n].shape)
    if unknown or absent or wrong:
        raise ValueError(f"the tensors of {file!r} do not fit this model: unknown {unknown}, absent {absent}, "
                         f"mis-shaped {[(n, tuple(tensors[n].shape), tuple(params[n].shape)) for n in wrong]}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"tensor {name!r} of {file!r} is {t.dtype}, not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} of {file!r} has NaN or infinite values")


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
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(path, "head.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path!r} has no readable task head: {e}") from None
    cls = _head_classes().get(meta.get("class")) if isinstance(meta, dict) else None
    if cls is None:
        raise ValueError(f"{meta_file}: unknown head class {meta.get('class') if isinstance(meta, dict) else meta!r}")
    try:
        kwargs = {"layer": meta["layer"]}
        if meta["class"] == "SequenceClassifier":
            kwargs["pooling"] = meta["pooling"]
        args = (backbone,) if meta["class"] == "QuestionAnswering" else (backbone, meta["num_labels"])
        model = cls(*args, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_file} does not describe a {meta['class']} head: {e!r}") from None
    params = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
    _check_saved_tensors(os.path.join(path, "head.safetensors"), tensors, params, params)
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model
