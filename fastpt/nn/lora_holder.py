"""The base class of the modules that hold LoRA factors beside a base layer."""

from __future__ import annotations

from torch import nn


class LoRAHolder(nn.Module):
    """A module with LoRA factors (children ``lora_A``, ``lora_B``) beside its base layer,
    which ``merged`` says holds the update folded in: :class:`fastpt.nn.LoRALinear` and
    fastpt.finetune's ``LoraLayer``. ``quantize_`` quantizes the base layer, never the
    factors. Defined here so that fastpt.nn need not import the adaptation layer above it."""

    FACTOR_NAMES = ("lora_A", "lora_B")
    merged: bool
