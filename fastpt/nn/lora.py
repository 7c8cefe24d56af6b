"""LoRA adapter around a frozen linear layer (Hu et al. 2021), PEFT-compatible."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastpt.nn.int8_linear import Int8Linear
from fastpt.nn.lora_holder import LoRAHolder
from fastpt.ops.lora import lora_linear


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """scaling * B @ A in float32, (out, in): the update merge() adds to the base weight."""
    return scaling * (b.detach().float() @ a.detach().float())


def _factor_stamp(a: Tensor, b: Tensor, scaling: float) -> tuple:
    # Storage and version counter, as fastpt.nn.Linear keeps its weight copies: any in-place
    # change (load_state_dict's copy_, an optimizer step, an init) bumps the version, .to()
    # and assign=True loads change the storage.
    return (a.data_ptr(), a._version, b.data_ptr(), b._version, scaling)


class MergedFactors:
    """What an nn.Linear base weight holds while merged: W0 + scaling * B @ A for these
    factors, copied at merge time.

    unmerge() subtracts the delta of these copies, not of the live factors, so it restores W0
    (to float rounding) whatever was loaded into the factors meanwhile. The copies cost
    r * (in + out) numbers, the rank-r factors themselves; the delta would cost out * in and
    W0 as much again. The same float32 computation (``lora_delta``) on the same values gives
    the very delta that merge() added."""

    __slots__ = ("a", "b", "scaling", "stamp")

    def __init__(self, a: Tensor, b: Tensor, scaling: float):
        self.a, self.b, self.scaling = a.detach().clone(), b.detach().clone(), scaling
        self.stamp = _factor_stamp(a, b, scaling)

    def delta(self) -> Tensor:
        return lora_delta(self.a, self.b, self.scaling)

    def holds(self, a: Tensor, b: Tensor, scaling: float) -> bool:
        """Whether (a, b, scaling) are still the merged factors: the same storage and version
        (one tuple compare, the common case), or else the same values (a move with .to(),
        which the copies then follow, or a load of the same values)."""
        stamp = _factor_stamp(a, b, scaling)
        if stamp == self.stamp:
            return True
        if scaling != self.scaling or not all(
                t.dtype == c.dtype and t.shape == c.shape and torch.equal(t.detach(), c.to(t.device))
                for t, c in ((a, self.a), (b, self.b))):
            return False
        self.a, self.b, self.stamp = self.a.to(a.device), self.b.to(b.device), stamp
        return True


@torch.no_grad()
def add_to_weight(weight: Tensor, delta: Tensor) -> None:
    """weight += delta, computed in float32 (the weight keeps its dtype)."""
    weight.copy_((weight.float() + delta).to(weight.dtype))


def loading_another_merged_weight(base: nn.Linear, state_dict: dict, key: str) -> bool:
    """Whether a state dict being loaded into a merged layer brings a base weight other than
    the one held. A state dict taken while merged holds the merged weight with its factors:
    one with another weight (another layer's merged state) is taken as merged with the
    factors it comes with. The same weight (the layer's own state dict, new factors in it)
    still holds the factors merged before, which then give way to the loaded ones."""
    w = state_dict.get(key)
    if not isinstance(w, Tensor) or w.shape != base.weight.shape or w.is_meta or base.weight.is_meta:
        return False
    return not torch.equal(w.to(device=base.weight.device, dtype=base.weight.dtype), base.weight)


class LoRALinear(LoRAHolder):
    """out = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), base frozen.

    Matches PEFT's ``LoraLayer`` for one adapter: ``lora_A`` (nn.Linear in -> r, weight
    (r, in), Kaiming-uniform with a = sqrt(5)), ``lora_B`` (nn.Linear r -> out, weight
    (out, r), zeros), ``scaling = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA),
    dropout on the LoRA input only while training. State-dict keys: ``base_layer.*``,
    ``lora_A.weight``, ``lora_B.weight``.

    merge() folds the update into the weight; while merged, forward follows the factors
    (load_state_dict, an optimizer step, reset_lora_parameters, a changed ``scaling``), and
    unmerge() restores the base weight (to float rounding) whatever they became. (A forward
    under torch.compile cannot see such a change: an eager forward or merge() brings it in.)
    A state dict taken while merged holds the merged weight: load it into a merged layer.

    Args:
        base_layer: nn.Linear or fastpt.nn.Int8Linear; its parameters are frozen.
        r: rank, 1 <= r <= min(in_features, out_features).
        lora_alpha, lora_dropout, use_rslora: as in PEFT.
        dtype: of the LoRA factors; default the base weight's (float32 for Int8Linear).
            Inputs must have this dtype; with an nn.Linear base it must be the weight's (the
            fused op runs one dtype: autocast mixes them).
    """

    def __init__(self, base_layer: nn.Linear | Int8Linear, r: int = 8, lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Int8Linear)):
            raise TypeError(f"base_layer must be nn.Linear or Int8Linear, got {type(base_layer).__name__}")
        n_in, n_out = base_layer.in_features, base_layer.out_features
        if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= min(n_in, n_out)):
            raise ValueError(f"r must be an int in [1, min(in_features, out_features)] = [1, {min(n_in, n_out)}], got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")  # scaling NaN: NaN outputs
        if isinstance(base_layer, nn.Linear) and dtype is not None and dtype != base_layer.weight.dtype:
            # no input dtype could run it: x must match both the factors and the weight
            raise TypeError(f"dtype {dtype} differs from the base layer's weight dtype {base_layer.weight.dtype}: "
                            "the fused op runs one dtype; convert the base layer, or run under autocast")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        is_int8 = isinstance(base_layer, Int8Linear)
        device = base_layer.weight_packed.device if is_int8 else base_layer.weight.device
        dtype = dtype or (torch.float32 if is_int8 else base_layer.weight.dtype)
        self.in_features, self.out_features, self.r = n_in, n_out, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = float(lora_alpha), float(lora_dropout), use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Linear(n_in, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, n_out, bias=False, device=device, dtype=dtype)
        self.merged = False
        self._merged_weight: tuple | None = None  # Int8Linear base: (stamp, merged float32 copy)
        self._merged_factors: MergedFactors | None = None  # nn.Linear base: what the weight holds
        self._adopt_on_load = False
        self.reset_lora_parameters()
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if self.merged:
            if isinstance(base, Int8Linear):
                bias = base.bias.to(x.dtype) if base.bias is not None else None
                return F.linear(x, self._merged_int8_weight().to(x.dtype), bias)
            if not torch.compiler.is_compiling():  # dynamo cannot read version counters
                self._follow_factors()
            return base(x)
        p = self.lora_dropout if self.training else 0.0
        a, b = self.lora_A.weight, self.lora_B.weight
        if isinstance(base, Int8Linear):
            return lora_linear(x, base, a, b, self.scaling, None, p)
        return lora_linear(x, base.weight, a, b, self.scaling, base.bias, p)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A in float32, (out, in)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the weight (computed in float32). nn.Linear base: in place,
        keeping a copy of the factors merged (see ``MergedFactors``); Int8Linear base: onto a
        float32 dequantized copy (the int8 weight is untouched), used by forward until
        unmerge(). Idempotent: merging a merged layer leaves the update in once (that of the
        current factors)."""
        base = self.base_layer
        if isinstance(base, Int8Linear):
            self._merged_int8_weight()
        elif self.merged:
            self._follow_factors()
        else:
            add_to_weight(base.weight, self.delta_weight())
            self._merged_factors = MergedFactors(self.lora_A.weight, self.lora_B.weight, self.scaling)
        self.merged = True

    def _follow_factors(self) -> None:
        """nn.Linear base, merged: where the factors or the scaling changed since they were
        merged, swap the merged delta for the current one in the weight."""
        merged, a, b = self._merged_factors, self.lora_A.weight, self.lora_B.weight
        if merged.holds(a, b, self.scaling):
            return
        add_to_weight(self.base_layer.weight, self.delta_weight() - merged.delta())
        self._merged_factors = MergedFactors(a, b, self.scaling)

    def _merged_int8_weight(self) -> Tensor:
        """Int8Linear base: dequantized weight + delta_weight(), float32, kept until the factors,
        the base weight or the scaling change (version counter or storage, as fastpt.nn.Linear
        keeps its copies). The copy is no state of its own (state_dict holds the int8 weight
        and the factors), so load_state_dict, reset_lora_parameters, an optimizer step or .to()
        while merged must reach forward."""
        base = self.base_layer
        if torch.compiler.is_compiling():  # dynamo cannot compare data pointers: no copy kept
            with torch.no_grad():
                return base.dequantized_weight(torch.float32) + self.delta_weight()
        parts = (self.lora_A.weight, self.lora_B.weight, base.weight_packed, base.weight_scale)
        stamp = (tuple((t.data_ptr(), t._version) for t in parts), self.scaling)
        if self._merged_weight is None or self._merged_weight[0] != stamp:
            self._merged_weight = None  # free the stale copy before making the new one
            with torch.no_grad():
                self._merged_weight = (stamp, base.dequantized_weight(torch.float32) + self.delta_weight())
        return self._merged_weight[1]

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undoes merge(): subtracts the float32 update that the weight holds, that of the
        factors as merged, whatever they are now (nn.Linear base), or drops the merged copy
        (Int8Linear base)."""
        if not self.merged:
            return
        base = self.base_layer
        if isinstance(base, Int8Linear):
            self._merged_weight = None
        else:
            add_to_weight(base.weight, -self._merged_factors.delta())
            self._merged_factors = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")


def _before_load(module: LoRALinear, state_dict, prefix, *_) -> None:
    module._adopt_on_load = (module.merged and module._merged_factors is not None
                             and loading_another_merged_weight(module.base_layer, state_dict,
                                                               prefix + "base_layer.weight"))


def _after_load(module: LoRALinear, _incompatible_keys) -> None:
    if module._adopt_on_load:  # the loaded merged weight holds the loaded factors
        module._merged_factors = MergedFactors(module.lora_A.weight, module.lora_B.weight, module.scaling)
        module._adopt_on_load = False
