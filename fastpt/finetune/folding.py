"""LoRA and IA3 layers folded into plain linears for a merged save, the model itself left as it was."""

from __future__ import annotations

import contextlib

import torch


class _FoldedLinear(torch.nn.Module):
    """A plain linear's tensors (``weight``, ``bias``) under the names a merged checkpoint has."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)


def _folded_lora(m) -> _FoldedLinear:
    """The weight ``merge_and_unload`` would give ``m`` (the merged adapters with their current
    factors, as forward runs them, plus the active one), computed into new tensors."""
    from fastpt.nn.int8_linear import Int8Linear
    base = m.base_layer
    active = m.delta_weight(m.active) if m.active and m.active not in m.merged else 0
    if isinstance(base, Int8Linear):  # the int8 weight holds no adapter: they apply on its dequantized copy
        bias = base.bias.float() if base.bias is not None else None
        return _FoldedLinear(m._merged_int8_weight() + active, bias)
    w = base.weight
    for name in m.merged:  # factors changed since merging: forward swaps in their delta
        merged = m._merged_factors[name]
        if not merged.holds(*m._factors(name)):
            w = (w.float() + (m.delta_weight(name) - merged.delta())).to(w.dtype)
    return _FoldedLinear((w.float() + active).to(w.dtype), base.bias)


def _folded_ia3(m) -> _FoldedLinear:
    """IA3 scales folded into the weight they scale: output scales into rows (and the bias),
    input scales into columns."""
    w, b = m.base.weight, m.base.bias
    if m.on == "output":
        return _FoldedLinear(w * m.ia3_l.unsqueeze(1), b * m.ia3_l if b is not None else None)
    return _FoldedLinear(w * m.ia3_l.unsqueeze(0), b)


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextlib.contextmanager
def _folded(backbone: torch.nn.Module):
    """``backbone`` with its LoRA and IA3 layers swapped, inside the ``with`` block, for plain
    linears holding the folded weights; then the wrappers go back untouched. Folding in place
    and undoing it would not give the weights back bit for bit (float rounding), and the
    caller may go on training: its model, optimizer state and merged state stay as they were.
    The cost is one copy of the wrapped layers' weights, not of the whole model."""
    from fastpt.finetune.lora import LoraLayer
    from fastpt.finetune.peft_modules import IA3Linear
    with torch.no_grad():
        swaps = [(path, m, _folded_lora(m) if isinstance(m, LoraLayer) else _folded_ia3(m))
                 for path, m in backbone.named_modules() if isinstance(m, (LoraLayer, IA3Linear))]
    try:
        for path, _, plain in swaps:
            _set_submodule(backbone, path, plain)
        yield backbone
    finally:
        for path, wrapper, _ in swaps:
            _set_submodule(backbone, path, wrapper)
