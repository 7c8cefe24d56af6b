"""Prefix tuning (Li & Liang 2021) for decoders: m learned key/value vectors per layer that
every query attends to, before the real keys.

Training uses the reparameterisation Embedding(m, d) -> Linear -> tanh -> Linear(2 L Hkv D)
(more stable than learning the prefixes directly); ``PrefixTuning.freeze()`` computes the
prefixes once and drops the MLP, as the paper does after training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastpt.models import Decoder


class PrefixTuning(nn.Module):
    def __init__(self, config, length: int, projection: bool = True, hidden: int | None = None):
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        self.length, self.L = length, config.num_layers
        self.Hkv, self.D = config.num_kv_heads, config.head_dim
        out = 2 * self.L * self.Hkv * self.D
        if projection:
            hidden = hidden or config.hidden_size
            self.embedding = nn.Embedding(length, config.hidden_size)
            self.mlp = nn.Sequential(nn.Linear(config.hidden_size, hidden), nn.Tanh(), nn.Linear(hidden, out))
            self.prefix = None
        else:
            self.prefix = nn.Parameter(torch.randn(length, out) * 0.02)

    def key_values(self) -> Tensor:
        """(L, 2, Hkv, m, D) prefix keys and values."""
        flat = self.prefix if self.prefix is not None else self.mlp(self.embedding.weight)
        return flat.view(self.length, self.L, 2, self.Hkv, self.D).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep the computed prefixes as the parameter; drop the reparameterisation."""
        if self.prefix is None:
            self.prefix = nn.Parameter(self.key_values().permute(3, 0, 1, 2, 4).reshape(self.length, -1).clone())
            del self.embedding, self.mlp


class PrefixAttention(nn.Module):
    """A decoder layer's attention with the layer's prefix keys/values in front."""

    def __init__(self, attn: nn.Module, prefix: PrefixTuning, layer: int):
        super().__init__()
        self.attn, self.layer = attn, layer
        self._prefix = [prefix]  # owned by the model's prefix module, not registered twice

    def forward(self, x: Tensor, *, rotary=None, position_ids=None, cache=None, layer_idx: int = 0,
                causal: bool = False, key_padding_mask=None, attn_bias=None) -> Tensor:
        a = self.attn
        q = a.project_q(x)
        k, v = a.project_kv(x)
        if rotary is not None:
            q, k = rotary(q, k, position_ids)
        if cache is not None:  # generation: the cache holds the real keys; the prefix goes first
            k, v = cache.update(layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        B, m = x.shape[0], self._prefix[0].length
        pk, pv = self._prefix[0].key_values()[self.layer].to(q.dtype)  # (Hkv, m, D) each
        k = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
        v = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        if key_padding_mask is not None:
            key_padding_mask = torch.cat([key_padding_mask.new_ones(B, m), key_padding_mask], 1)
        if attn_bias is not None:
            attn_bias = nn.functional.pad(attn_bias, (m, 0))
        # Causal attention with S = m + T keys is aligned bottom-right: every query sees all
        # m prefix keys, then the real keys causally.
        return a.attend_and_project(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                    attn_bias=attn_bias)


def add_prefix_tuning(backbone: nn.Module, length: int, projection: bool = True) -> PrefixTuning:
    if not isinstance(backbone, Decoder):
        raise TypeError(f"prefix tuning is implemented for fastpt Decoders, got {type(backbone).__name__}")
    prefix = PrefixTuning(backbone.config, length, projection)
    backbone.prefix_tuning = prefix
    for i, layer in enumerate(backbone.layers):
        layer.attn = PrefixAttention(layer.attn, prefix, i)
    return prefix
