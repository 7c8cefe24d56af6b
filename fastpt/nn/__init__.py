"""Modules built on fastpt's fused ops."""

from fastpt.nn.attention import Attention, KVCache
from fastpt.nn.int8_linear import Int8Linear, quantize_
from fastpt.nn.linear import Linear, clear_weight_caches
from fastpt.nn.lora import LoRALinear
from fastpt.nn.rms_norm import RMSNorm
from fastpt.nn.rotary import RotaryEmbedding
from fastpt.nn.swiglu import SwiGLU

__all__ = ["Attention", "Int8Linear", "KVCache", "Linear", "LoRALinear", "RMSNorm", "RotaryEmbedding", "SwiGLU",
           "clear_weight_caches", "quantize_"]
