"""Modules built on fastpt's fused ops."""

from fastpt.nn.attention import Attention, KVCache
from fastpt.nn.rms_norm import RMSNorm
from fastpt.nn.rotary import RotaryEmbedding
from fastpt.nn.swiglu import SwiGLU

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU"]
