"""Int8 linear layer in the style of LLM.int8(), and ``quantize_`` to swap a model's layers."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastpt.nn.lora_holder import LoRAHolder
from fastpt.ops import int8 as int8_ops


class Int8Linear(nn.Module):
    """nn.Linear with a per-output-channel int8 weight, packed once for the int8 kernels.

    forward(x) = int8 GEMM of the row-wise int8 x on the columns without outliers + x's
    outlier columns (any |x| > threshold) times the dequantized weight columns in x's
    precision, + bias (``fastpt.ops.int8_linear``). Works as a frozen base under LoRA:
    gradients flow to the input; the int8 weight has none (buffers, not parameters).

    Buffers: ``weight_packed`` (int8, the kernels' layout: about in*out bytes, 4x below
    float32), ``weight_colsum`` (int32), ``weight_scale`` (float32 (out,), kept float32 by
    ``.to(dtype)``), ``weight_shape`` ((out, in), checked when a state dict is loaded; state
    dicts saved without it load as before). ``bias`` is a frozen float parameter or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = int8_ops.DEFAULT_THRESHOLD, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"sizes must be positive, got {in_features} and {out_features}")
        _check_threshold(threshold)
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        packed, colsum = int8_ops.pack_int8_weight(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_colsum", colsum)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        # The packed weight holds in_features only rounded up to 64 columns: without this, the
        # state dict of a layer with another in_features loaded and ran on zero columns.
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32),
                                  requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = int8_ops.DEFAULT_THRESHOLD) -> "Int8Linear":
        """Quantizes linear.weight per output channel (absmax / 127); bias copied as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    threshold=threshold, device=w.device, dtype=w.dtype if w.dtype != torch.float64 else None)
        q, scale = int8_ops.quantize_weight(w if w.dtype != torch.float64 else w.float())
        if not torch.isfinite(scale).all():
            raise ValueError("linear.weight holds NaN or Inf: it cannot be quantized")
        layer.load_int8_weight(q, scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def load_int8_weight(self, weight_int8: Tensor, scale: Tensor) -> None:
        """Sets the (out, in) int8 weight and its (out,) float32 scales (packs it)."""
        if weight_int8.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must be {(self.out_features, self.in_features)}, got {tuple(weight_int8.shape)}")
        if scale.shape != (self.out_features,):  # copy_ would broadcast a scalar silently
            raise ValueError(f"scale must be ({self.out_features},), one per output row, got {tuple(scale.shape)}")
        packed, colsum = int8_ops.pack_int8_weight(weight_int8.to(self.weight_packed.device))
        self.weight_packed.copy_(packed)
        self.weight_colsum.copy_(colsum)
        self.weight_scale.copy_(scale)

    @property
    def weight_int8(self) -> Tensor:
        """The (out, in) int8 weight (unpacked copy)."""
        return int8_ops.unpack_int8_weight(self.weight_packed, self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """weight_int8 * weight_scale[:, None] in dtype (a new tensor)."""
        return int8_ops.dequantize_packed_weight(self.weight_packed, self.weight_scale,
                                                 self.out_features, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The packed weight knows in_features only rounded up to its 64-column blocks.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: x's last dim must be in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return int8_ops.int8_linear(x, self.weight_packed, self.weight_colsum, self.weight_scale,
                                    self.out_features, self.bias, self.threshold)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight_shape"
        saved = state_dict.get(key)
        if saved is None:  # saved before fastpt recorded it: read as this layer's (the packed
            state_dict = {**state_dict, key: self.weight_shape}  # shape is still checked)
        elif not saved.is_meta and saved.tolist() != [self.out_features, self.in_features]:
            error_msgs.append(f"size mismatch for {prefix}weight_packed: copying an int8 weight of (out, in) = "
                              f"{tuple(saved.tolist())} into an Int8Linear of "
                              f"{(self.out_features, self.in_features)}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # .to(bfloat16) etc.: keep the scales exact
            self.weight_scale = scale.to(self.weight_scale.device)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__} {threshold!r}")
    if not threshold > 0:  # also rejects NaN
        raise ValueError(f"threshold must be > 0 (math.inf: no outlier columns), got {threshold}")


def quantize_(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              threshold: float = int8_ops.DEFAULT_THRESHOLD) -> nn.Module:
    """Replaces, in place, every nn.Linear of model for which filter_fn(module, name) is
    true (default: all) by Int8Linear.from_linear(module, threshold). LoRA factors
    (fastpt.nn.LoRALinear's, and the adapters fastpt.finetune adds) are never quantized;
    their base layer is, unless the LoRA update is merged into it (ValueError: unmerge()
    first, or the update would be quantized into the base and added again by forward).
    Returns model."""
    _check_threshold(threshold)

    def visit(module: nn.Module, prefix: str) -> None:
        lora = isinstance(module, LoRAHolder)
        for name, child in list(module.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if lora and name in LoRAHolder.FACTOR_NAMES:
                continue
            if isinstance(child, nn.Linear) and (filter_fn is None or filter_fn(child, fqn)):
                if lora and module.merged:
                    raise ValueError(f"quantize_: {prefix} holds a merged LoRA update in its base layer; "
                                     f"unmerge() it before quantizing, merge() again after")
                setattr(module, name, Int8Linear.from_linear(child, threshold))
            else:
                visit(child, fqn)

    if isinstance(model, nn.Linear):
        raise TypeError("quantize_ swaps the children of model; pass the parent module, "
                        "or use Int8Linear.from_linear for a single layer")
    visit(model, "")
    return model


__all__ = ["Int8Linear", "quantize_"]
