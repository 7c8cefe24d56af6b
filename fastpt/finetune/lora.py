"""LoRA on chosen linear layers, with several named adapters (PEFT's in-memory layout).

Each targeted ``nn.Linear`` (or ``fastpt.nn.Int8Linear``) is replaced in place by a
``LoraLayer`` holding the frozen ``base_layer`` and, per adapter name, ``lora_A[name]``
(r, in) and ``lora_B[name]`` (out, r) with PEFT's init and scaling (see
``fastpt.nn.LoRALinear``, whose fused op ``fastpt.ops.lora_linear`` runs the forward and
backward here too). State-dict keys match PEFT: ``...q_proj.base_layer.weight``,
``...q_proj.lora_A.<name>.weight``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from fastpt.nn.int8_linear import Int8Linear
from fastpt.nn.linear import Linear
from fastpt.nn.lora_holder import LoRAHolder
from fastpt.nn.lora import MergedFactors, add_to_weight, loading_another_merged_weight, lora_delta
from fastpt.ops.lora import lora_linear

# Architecture-aware defaults (PEFT's choices): attention projections.
DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "classifier", "qa_outputs", "nsp_head", "score")


class LoraLayer(LoRAHolder):
    """Merging (``merge``) folds adapters into the weight, as ``fastpt.nn.LoRALinear`` does:
    while merged, forward follows their factors, and ``unmerge`` restores the base weight (to
    float rounding) whatever they became (under torch.compile, once an eager forward or
    ``merge`` has seen the change); a state dict taken while merged holds the merged weight."""

    def __init__(self, base_layer: nn.Linear | Int8Linear):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Int8Linear)):
            raise TypeError(f"LoRA wraps nn.Linear or Int8Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}  # the scaling alone cannot tell alpha / r from alpha / sqrt(r)
        self.active: str | None = None
        self.disabled = False
        self.merged: list[str] = []
        # nn.Linear base: per merged adapter, the factors whose delta the weight holds
        self._merged_factors: dict[str, MergedFactors] = {}
        self._adopt_on_load = False
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)

    @staticmethod
    def check_rank(r, n_in: int, n_out: int, path: str = "") -> None:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"LoRA rank r must be an int, got {type(r).__name__} {r!r}")
        if not 1 <= r <= min(n_in, n_out):
            where = f" {path}" if path else ""
            raise ValueError(f"LoRA rank r={r} must be in [1, min(in, out) = {min(n_in, n_out)}] "
                             f"for the {n_in} -> {n_out} layer{where}")

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        n_in, n_out = self.in_features, self.out_features
        self.check_rank(r, n_in, n_out)
        check_lora_hyperparameters(alpha, dropout)
        w = self._base_weight_ref()
        self.lora_A[name] = nn.Linear(n_in, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, n_out, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout[name] = dropout
        self.rslora[name] = rslora
        self.active = self.active or name

    def _base_weight_ref(self) -> Tensor:
        base = self.base_layer
        if isinstance(base, Int8Linear):
            return torch.empty(0, device=base.weight_packed.device, dtype=torch.float32)
        return base.weight

    def forward(self, x: Tensor) -> Tensor:
        base, name = self.base_layer, self.active
        if self.disabled and self.merged:
            raise RuntimeError("disable_adapter() on merged weights: unmerge() first")
        is_int8 = isinstance(base, Int8Linear)
        if self.merged and not is_int8 and not torch.compiler.is_compiling():
            self._follow_factors()  # (dynamo cannot read version counters)
        if self.disabled or name is None or name in self.merged:
            return self._merged_forward(x) if is_int8 and self.merged else base(x)
        a, b = self.lora_A[name].weight.to(x.dtype), self.lora_B[name].weight.to(x.dtype)
        p = self.dropout[name] if self.training else 0.0
        if is_int8 and self.merged:  # the merged adapters on the dequantized copy, the active on top
            bias = base.bias.to(x.dtype) if base.bias is not None else None
            return lora_linear(x, self._merged_int8_weight().to(x.dtype), a, b, self.scaling[name], bias, p)
        if is_int8:
            return lora_linear(x, base, a, b, self.scaling[name], None, p)
        return lora_linear(x, base.weight, a, b, self.scaling[name], base.bias, p)

    def delta_weight(self, name: str) -> Tensor:
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def _factors(self, name: str) -> tuple:
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

    def _follow_factors(self) -> None:
        """nn.Linear base: for each merged adapter whose factors or scaling changed since they
        were merged, swap the merged delta for the current one in the weight."""
        for name in self.merged:
            merged = self._merged_factors[name]
            if not merged.holds(*self._factors(name)):
                add_to_weight(self.base_layer.weight, self.delta_weight(name) - merged.delta())
                self._merged_factors[name] = MergedFactors(*self._factors(name))

    def _merged_int8_weight(self) -> Tensor:
        """Int8Linear base: the dequantized weight with the merged adapters' current deltas."""
        w = self.base_layer.dequantized_weight(torch.float32)
        return w + sum(self.delta_weight(n) for n in self.merged)

    def _merged_forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        w = self._merged_int8_weight()
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        return nn.functional.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += scaling * B A in float32, keeping a copy of the factors merged (Int8Linear base:
        applied to a dequantized copy at forward time, the int8 weight is never changed).
        Idempotent: an adapter merged again is in the weight once, with its current factors."""
        is_int8 = isinstance(self.base_layer, Int8Linear)
        if name in self.merged:
            if not is_int8:
                self._follow_factors()
            return
        if not is_int8:
            add_to_weight(self.base_layer.weight, self.delta_weight(name))
            self._merged_factors[name] = MergedFactors(*self._factors(name))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the updates that the weight holds, those of the factors as merged,
        whatever they are now."""
        if not isinstance(self.base_layer, Int8Linear):
            for name in reversed(self.merged):
                add_to_weight(self.base_layer.weight, -self._merged_factors.pop(name).delta())
        self.merged = []
        self._merged_factors = {}


def _before_load(module: LoraLayer, state_dict, prefix, *_) -> None:
    module._adopt_on_load = (bool(module._merged_factors) and loading_another_merged_weight(
        module.base_layer, state_dict, prefix + "base_layer.weight"))


def _after_load(module: LoraLayer, _incompatible_keys) -> None:
    if module._adopt_on_load:  # the loaded merged weight holds the loaded factors
        module._merged_factors = {n: MergedFactors(*module._factors(n)) for n in module.merged}
        module._adopt_on_load = False


def check_lora_hyperparameters(alpha, dropout) -> None:
    """alpha a finite number > 0 (the update's scale alpha / r), dropout in [0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")


def _targets(model: nn.Module, target_modules) -> list[str]:
    """Paths of the linears (or already wrapped LoraLayers) matching ``target_modules``;
    the linears inside a LoraLayer (its base and factors) are never targets themselves."""
    linears, inside = [], []
    for n, m in model.named_modules():
        if any(n.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, LoraLayer):
            inside.append(n)
            linears.append(n)
        elif isinstance(m, (nn.Linear, Int8Linear)):
            linears.append(n)
    if target_modules == ALL_LINEAR:
        return [n for n in linears if n.split(".")[-1] not in _HEAD_NAMES
                and not n.startswith(_HEAD_NAMES) and "pooler" not in n]
    if isinstance(target_modules, str):  # one module name, as PEFT takes it
        target_modules = [target_modules]
    if target_modules is not None and (not isinstance(target_modules, (list, tuple, set))
                                       or not all(isinstance(t, str) for t in target_modules)):
        # an int failed as "'int' object is not iterable"
        raise TypeError(f"target_modules must be None, {ALL_LINEAR!r}, a module name or a list of module "
                        f"names, got {target_modules!r}")
    if target_modules is not None and not target_modules:
        raise ValueError("target_modules is empty: name the modules to adapt, pass None for "
                         f"the defaults {list(DEFAULT_TARGETS)} or {ALL_LINEAR!r}")
    wanted = tuple(target_modules or DEFAULT_TARGETS)
    found = [n for n in linears if n.split(".")[-1] in wanted or n in wanted]
    missing = [w for w in wanted if not any(n.split(".")[-1] == w or n == w for n in found)]
    if missing:
        names = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(f"LoRA target modules {missing} not found; this model's linear layers are "
                         f"named {names}")
    return found


def add_lora(model: nn.Module, name: str = "default", *, r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, target_modules=None, use_rslora: bool = False) -> list[str]:
    """Add adapter ``name`` to the target linears (wrapping them on first use); returns the
    module names it was added to. Like PEFT, everything else in ``model`` is frozen and only
    the newest adapter's factors train (``set_adapter`` switches)."""
    if not isinstance(name, str) or not name or "." in name:
        # an int failed in torch as "module name should be a string"; a dot would nest the key
        raise TypeError(f"the adapter name must be a non-empty string without '.', got {name!r}")
    check_lora_hyperparameters(alpha, dropout)
    targets = _targets(model, target_modules)
    for path in targets:  # every check before the first layer is wrapped: no half-adapted model
        layer = model.get_submodule(path)
        LoraLayer.check_rank(r, layer.in_features, layer.out_features, path)
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            raise ValueError(f"adapter {name!r} already exists on {path}")
    wrapped = []
    for path in targets:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, leaf)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            setattr(owner, leaf, layer)
        if name in layer.lora_A:
            raise ValueError(f"adapter {name!r} already exists on {path}")
        layer.add_adapter(name, r, alpha, dropout, use_rslora)
        wrapped.append(path)
    model.requires_grad_(False)
    set_adapter(model, name)
    return wrapped


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active (and only trainable) adapter."""
    layers = lora_layers(model)
    if not any(name in m.lora_A for m in layers):
        known = sorted({n for m in layers for n in m.lora_A})
        raise ValueError(f"no adapter named {name!r}; adapters: {known}")
    for m in layers:
        m.active = name if name in m.lora_A else None
        for n in m.lora_A:
            m.lora_A[n].weight.requires_grad_(n == name)
            m.lora_B[n].weight.requires_grad_(n == name)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model only, inside the ``with`` block."""
    layers = lora_layers(model)
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, p in zip(layers, previous):
            m.disabled = p


def merge(model: nn.Module) -> None:
    for m in lora_layers(model):
        if m.active is not None:
            m.merge(m.active)


def unmerge(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into plain ``nn.Linear`` layers and drop every LoRA module
    (an Int8Linear base becomes a float32 ``fastpt.nn.Linear`` with the merged weight)."""
    for path, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        base = m.base_layer
        if m.merged and not isinstance(base, Int8Linear):
            m._follow_factors()  # the weight as forward has it: merged with the current factors
        delta = m.delta_weight(m.active) if m.active and m.active not in m.merged else 0
        if isinstance(base, Int8Linear):
            w = m._merged_int8_weight() + delta
            plain = Linear(m.in_features, m.out_features, bias=base.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(w)
                if base.bias is not None:
                    plain.bias.copy_(base.bias.float())
        else:
            with torch.no_grad():
                base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            plain = base
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, plain)
    from fastpt.finetune.strategies import RECORDED_CONFIG  # (strategies imports this module)
    for m in model.modules():
        if getattr(getattr(m, RECORDED_CONFIG, None), "strategy", None) in ("lora", "int8_lora"):
            delattr(m, RECORDED_CONFIG)  # a plain model again: prepare may adapt it anew
    return model
