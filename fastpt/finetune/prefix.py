"""Prefix tuning (Li & Liang 2021) for decoders and encoder-decoders: m learned key/value
vectors per attention that every query attends to, before the real keys. A Seq2Seq gets them
in every attention, as the paper's BART: encoder self-attention, decoder self-attention and
decoder cross-attention (all padding masks extended; the decoder's KV cache holds only real
keys, the cross-attention cache the prefixed ones).

Training uses the reparameterisation Embedding(m, d) -> Linear -> tanh -> Linear(2 L Hkv D)
(more stable than learning the prefixes directly); ``PrefixTuning.freeze()`` computes the
prefixes once and drops the MLP, as the paper does after training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastpt.models import Decoder, Seq2Seq


class PrefixTuning(nn.Module):
    """Prefixes of ``num_sites`` attentions (default: ``config.num_layers``), each with the
    config's kv heads (``num_kv_heads``, else ``num_heads``) of ``head_dim``."""

    def __init__(self, config, length: int, projection: bool = True, hidden: int | None = None,
                 num_sites: int | None = None):
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        self.length, self.L = length, num_sites or config.num_layers
        self.Hkv, self.D = getattr(config, "num_kv_heads", None) or config.num_heads, config.head_dim
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
    """A layer's self-attention with its prefix keys/values in front (prefix ``layer``:
    the attention's index among the prefix's sites)."""

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


class PrefixCrossAttention(nn.Module):
    """A Seq2Seq decoder layer's cross-attention with the prefix keys/values in front of the
    encoder's. The layer calls it piecewise (``project_kv`` once per generation, its result
    cached): the prefix joins the keys there, and the encoder's padding mask is extended in
    ``attend_and_project``."""

    def __init__(self, attn: nn.Module, prefix: PrefixTuning, site: int):
        super().__init__()
        self.attn, self.site = attn, site
        self._prefix = [prefix]

    def project_q(self, x: Tensor) -> Tensor:
        return self.attn.project_q(x)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.attn.project_kv(memory)
        pk, pv = self._prefix[0].key_values()[self.site].to(k.dtype)  # (Hkv, m, D) each
        B = memory.shape[0]
        return torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)

    def attend_and_project(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask=None, **masks) -> Tensor:
        if key_padding_mask is not None:
            B, m = key_padding_mask.shape[0], self._prefix[0].length
            key_padding_mask = torch.cat([key_padding_mask.new_ones(B, m), key_padding_mask], 1)
        return self.attn.attend_and_project(q, k, v, key_padding_mask=key_padding_mask, **masks)


def add_prefix_tuning(backbone: nn.Module, length: int, projection: bool = True) -> PrefixTuning:
    """Prefixes for every self-attention of a Decoder, or every attention of a Seq2Seq
    (sites: encoder layers, decoder layers, then decoder cross-attentions), held by
    ``backbone.prefix_tuning``. TypeError for other models (BERT-style Encoders)."""
    if not isinstance(backbone, (Decoder, Seq2Seq)):
        raise TypeError(f"prefix tuning is implemented for fastpt Decoders and Seq2Seq models, got "
                        f"{type(backbone).__name__}")
    from fastpt.finetune.strategies import layer_stacks  # strategies imports this module
    layers = [layer for _, stack in layer_stacks(backbone) for layer in stack]
    crossing = [layer for layer in layers if getattr(layer, "cross_attn", None) is not None]
    prefix = PrefixTuning(backbone.config, length, projection, num_sites=len(layers) + len(crossing))
    backbone.prefix_tuning = prefix
    for i, layer in enumerate(layers):
        layer.attn = PrefixAttention(layer.attn, prefix, i)
    for i, layer in enumerate(crossing, start=len(layers)):
        layer.cross_attn = PrefixCrossAttention(layer.cross_attn, prefix, i)
    return prefix
