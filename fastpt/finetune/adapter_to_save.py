"""What ``save_adapter`` writes: the adapter to save, its tensors under PEFT's names, and its checked config."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import torch

from fastpt.finetune.strategies import RECORDED_CONFIG, FinetuneConfig, backbone_of


def _config_of(model: torch.nn.Module, given: FinetuneConfig | None) -> FinetuneConfig:
    """The config to save with ``model``'s tensors. Another one than it was prepared with would
    still load, since the tensor shapes fit, but with other numbers (e.g. the LoRA scaling
    alpha / r): refused, naming the fields."""
    recorded = getattr(model, RECORDED_CONFIG, None)
    if given is not None and not isinstance(given, FinetuneConfig):
        raise TypeError(f"save_adapter's config must be a FinetuneConfig, got {type(given).__name__} "
                        f"(build one: FinetuneConfig(**settings))")
    if given is None and recorded is None:
        raise ValueError("save_adapter needs the FinetuneConfig of the model: it was not prepared by "
                         "fastpt.finetune.prepare (which records it), so pass config=")
    if given is not None and recorded is not None:
        differing = _differing_fields(given, recorded)
        if differing:
            raise ValueError("the config given to save_adapter is not the one the model was prepared "
                             f"with: {differing}; pass that one, or none (the model's is used)")
    return given if given is not None else recorded


_LORA_FACTOR = re.compile(r"\.lora_([AB])\.([^.]+)\.")


def _adapter_to_save(model: torch.nn.Module, config: FinetuneConfig, adapter_name) -> str | None:
    """The LoRA adapter to save: ``adapter_name``, or the active one (None: not LoRA)."""
    from fastpt.finetune.lora import lora_layers
    layers = lora_layers(model) if config.strategy in ("lora", "int8_lora") else []
    if not layers:
        if adapter_name is not None:
            raise ValueError(f"adapter_name={adapter_name!r}: the model has no LoRA adapters (it was prepared "
                             f"with strategy {config.strategy!r})")
        return None
    names = sorted({n for m in layers for n in m.lora_A})
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"no LoRA adapter named {adapter_name!r}; the model's adapters: {names}")
        return adapter_name
    active = sorted({m.active for m in layers if m.active is not None})
    if len(active) != 1:
        raise ValueError(f"the model's LoRA layers have the active adapters {active}, not one: pass "
                         f"adapter_name (one of {names})")
    return active[0]


def _adapter_tensors(model: torch.nn.Module, name: str | None) -> dict:
    """The trainable tensors, LoRA factors those of adapter ``name`` only (trainable or not),
    renamed to PEFT's ``default``."""
    tensors = {}
    for n, p in model.named_parameters():
        factor = _LORA_FACTOR.search(n)
        if factor:
            if factor.group(2) != name:
                continue
            n = f"{n[:factor.start()]}.lora_{factor.group(1)}.default.{n[factor.end():]}"
        elif not p.requires_grad:
            continue
        tensors[n] = p.detach().contiguous()
    return tensors


def _config_of_adapter(model: torch.nn.Module, config: FinetuneConfig, name: str) -> FinetuneConfig:
    """``config`` with the LoRA settings of adapter ``name`` (one added by ``add_lora``, which
    the recorded config does not describe), read off its layers."""
    from fastpt.finetune.lora import LoraLayer
    backbone = backbone_of(getattr(model, "model", model))
    layers = [(path, m) for path, m in backbone.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    if len(layers) != sum(1 for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A):
        raise ValueError(f"adapter {name!r} has LoRA layers outside the backbone: save_adapter saves "
                         "adapters added to the backbone (add_lora(model.backbone, ...))")
    settings = {(m.lora_A[name].weight.shape[0], m.scaling[name], m.dropout[name], m.rslora[name])
                for _, m in layers}
    if len(settings) != 1:
        raise ValueError(f"adapter {name!r} has other settings (rank, scaling, dropout) on different layers: "
                         "save_adapter saves an adapter added by one add_lora call")
    r, scaling, dropout, rslora = settings.pop()
    return dataclasses.replace(config, lora_r=r, lora_alpha=scaling * (math.sqrt(r) if rslora else r),
                               lora_dropout=dropout, use_rslora=rslora,
                               target_modules=[path for path, _ in layers])


def _differing_fields(given: FinetuneConfig, recorded: FinetuneConfig) -> str:
    # As saved (JSON): a tuple of target modules is the list it is saved as.
    a, b = (json.loads(json.dumps(c.to_dict())) for c in (given, recorded))
    return "; ".join(f"{n} is {a[n]!r}, prepared with {b[n]!r}" for n in a if a[n] != b.get(n))


def _check_lora_settings(model: torch.nn.Module, config: FinetuneConfig, name: str | None) -> None:
    """LoRA's settings that shape no tensor (alpha, rslora, dropout) of the adapter ``name`` to
    save, read off its layers: the model may have been adapted by hand (``add_lora``), with no
    config recorded."""
    from fastpt.finetune.lora import lora_layers
    if name is None:
        return
    for m in lora_layers(model):
        if name not in m.lora_A:
            continue
        r = m.lora_A[name].weight.shape[0]
        root = math.sqrt(r) if config.use_rslora else r
        scaling = "scaling (lora_alpha / (sqrt(r) if use_rslora else r))"
        expected = {"lora_r": (config.lora_r, r), scaling: (config.lora_alpha / root, m.scaling[name]),
                    "lora_dropout": (config.lora_dropout, m.dropout[name])}
        wrong = [f"{k}: config gives {want!r}, the layer has {have!r}"
                 for k, (want, have) in expected.items() if not math.isclose(want, have, rel_tol=1e-12)]
        if wrong:
            raise ValueError(f"the config given to save_adapter does not fit the model's LoRA layers "
                             f"(adapter {name!r}): {'; '.join(wrong)}")
