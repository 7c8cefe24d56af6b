"""LoRA adapter around a frozen linear layer (Hu et al. 2021), PEFT-compatible."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastpt.nn.int8_linear import Int8Linear
from fastpt.ops.lora import lora_linear


class LoRALinear(nn.Module):
    """out = base_layer(x) + scaling * lora_B(lora_A(dropout(x))), base frozen.

    Matches PEFT's ``LoraLayer`` for one adapter: ``lora_A`` (nn.Linear in -> r, weight
    (r, in), Kaiming-uniform with a = sqrt(5)), ``lora_B`` (nn.Linear r -> out, weight
    (out, r), zeros), ``scaling = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (rsLoRA),
    dropout on the LoRA input only while training. State-dict keys: ``base_layer.*``,
    ``lora_A.weight``, ``lora_B.weight``.

    Args:
        base_layer: nn.Linear or fastpt.nn.Int8Linear; its parameters are frozen.
        r: rank, 1 <= r <= min(in_features, out_features).
        lora_alpha, lora_dropout, use_rslora: as in PEFT.
        dtype: of the LoRA factors; default the base weight's (float32 for Int8Linear).
            Inputs must have this dtype.
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
        self.reset_lora_parameters()

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
            return base(x)
        p = self.lora_dropout if self.training else 0.0
        a, b = self.lora_A.weight, self.lora_B.weight
        if isinstance(base, Int8Linear):
            return lora_linear(x, base, a, b, self.scaling, None, p)
        return lora_linear(x, base.weight, a, b, self.scaling, base.bias, p)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A in float32, (out, in)."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the weight (computed in float32). nn.Linear base: in place;
        Int8Linear base: onto a float32 dequantized copy (the int8 weight is untouched), used
        by forward until unmerge()."""
        if self.merged:
            return
        base = self.base_layer
        if isinstance(base, Int8Linear):
            self._merged_int8_weight()
        else:
            base.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
        self.merged = True

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
        """Undoes merge(): subtracts the same float32 update (nn.Linear base) or drops the
        merged copy (Int8Linear base)."""
        if not self.merged:
            return
        base = self.base_layer
        if isinstance(base, Int8Linear):
            self._merged_weight = None
        else:
            base.weight.copy_((base.weight.float() - self.delta_weight()).to(base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")
