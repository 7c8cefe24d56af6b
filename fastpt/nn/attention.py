"""Multi-head attention on the fused attention op, with GQA, RoPE and a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastpt.nn.linear import Linear
from fastpt.nn.rotary import RotaryEmbedding
from fastpt.ops import reference
from fastpt.ops.attention import attention


class KVCache:
    """Keys and values of one attention layer, preallocated to (B, Hkv, max_len, D) and filled
    in place, so a decode step copies only its new tokens (``torch.cat`` would copy the whole
    history every step). The views it returns are read in place by the attention kernel."""

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, device=None,
                 dtype: torch.dtype = torch.float32):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds (B, Hkv, T, D) keys/values; returns all cached ones, (B, Hkv, length, D) views.
        Raises ValueError (shape, device, full) or TypeError (dtype) before writing anything."""
        self._check(k, v)
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KVCache full: {self.length} + {k.shape[2]} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0

    def _check(self, k: Tensor, v: Tensor) -> None:
        # Before anything is written: the slice assignment would broadcast another batch or
        # head count and cast another dtype silently, and a failed call must leave the cache
        # as it was.
        B, Hkv, _, D = self.k.shape
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, Hkv, D):
                raise ValueError(f"KVCache.append: {name} must be (batch_size, kv_heads, T, head_dim) = "
                                 f"({B}, {Hkv}, T, {D}), got {tuple(t.shape)}")
            if t.dtype != self.k.dtype:
                raise TypeError(f"KVCache.append: {name} must have the cache's dtype {self.k.dtype}, got {t.dtype}")
            if t.device != self.k.device:
                raise ValueError(f"KVCache.append: {name} must be on the cache's device {self.k.device}, "
                                 f"got {t.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"KVCache.append: k and v must have the same T, got {k.shape[2]} and {v.shape[2]}")


class Attention(nn.Module):
    """Self- or cross-attention: projections, optional RoPE, fastpt.ops.attention, output projection.

    Args:
        hidden_size: model width d (queries come from (B, T, d) inputs).
        num_heads: H. num_kv_heads: Hkv (GQA / MQA), default H. head_dim: D, default d / H.
        causal: decoder self-attention (bottom-right aligned, so it stays right with a cache).
        dropout: attention-probability dropout, applied in training mode only.
        scale: logit scale, default 1/sqrt(D) (T5: 1.0).
        bias: biases on the q/k/v projections; out_bias on the output one (default: bias).
        fused_qkv: one (d -> (H + 2 Hkv) D) projection ``qkv_proj`` instead of q_proj, k_proj,
            v_proj (HF Llama names); for cross-attention, q_proj plus a fused ``kv_proj``.
        kv_input_size: width of the cross-attention source (encoder states); None: self-attention.
        rotary: a RotaryEmbedding applied to q and k (positions offset by the cache length).
        use_fused: False runs the pure-PyTorch reference attention instead (for A/B checks).

    forward(x, kv=None, key_padding_mask=None, attn_bias=None, past_key_value=None, cache=None,
    position_ids=None, use_cache=False):
        x: (B, T, d); kv: (B, S, kv_input_size) for cross-attention.
        key_padding_mask: (B, S_total) bool, True = attend (covers cached keys too).
        attn_bias: broadcastable to (B, H, T, S_total).
        past_key_value: (k, v), each (B, Hkv, P, D), concatenated before the new keys; or
        cache: a KVCache, appended in place. position_ids: RoPE positions (default: P + arange(T)).
        Returns (B, T, d), and with use_cache also (k, v) of all keys so far.
        Cross-attention attends to the same encoder keys at every decoding step: a
        past_key_value, or a KVCache holding keys, is those keys, used as it is (kv is then
        not needed, and not read); kv is projected only when there is none, and fills an empty
        cache.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, *, causal: bool = False, dropout: float = 0.0,
                 scale: float | None = None, bias: bool = False, out_bias: bool | None = None,
                 fused_qkv: bool = True, kv_input_size: int | None = None,
                 rotary: RotaryEmbedding | None = None, device=None, dtype=None, use_fused: bool = True):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; pass head_dim")
            head_dim = hidden_size // num_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if rotary is not None and kv_input_size is not None:
            # the encoder's and the decoder's positions are not on one axis to rotate by
            raise ValueError("rotary embeddings apply to self-attention only, not with kv_input_size")
        self.H, self.Hkv, self.D = num_heads, num_kv_heads, head_dim
        self.causal, self.dropout, self.scale = causal, dropout, scale
        self.fused_qkv, self.cross = fused_qkv, kv_input_size is not None
        self.rotary, self.use_fused = rotary, use_fused
        kw = dict(bias=bias, device=device, dtype=dtype)
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        if self.cross:
            self.q_proj = Linear(hidden_size, q_out, **kw)
            if fused_qkv:
                self.kv_proj = Linear(kv_input_size, 2 * kv_out, **kw)
            else:
                self.k_proj = Linear(kv_input_size, kv_out, **kw)
                self.v_proj = Linear(kv_input_size, kv_out, **kw)
        elif fused_qkv:
            self.qkv_proj = Linear(hidden_size, q_out + 2 * kv_out, **kw)
        else:
            self.q_proj = Linear(hidden_size, q_out, **kw)
            self.k_proj = Linear(hidden_size, kv_out, **kw)
            self.v_proj = Linear(hidden_size, kv_out, **kw)
        self.o_proj = Linear(q_out, hidden_size, bias=bias if out_bias is None else out_bias, device=device,
                                dtype=dtype)

    def _heads(self, x: Tensor, heads: int) -> Tensor:  # (B, T, heads * D) -> (B, heads, T, D) view
        return x.unflatten(-1, (heads, self.D)).transpose(1, 2)

    def _project_kv(self, kv: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cross-attention's keys and values of the encoder states ``kv``."""
        if kv is None:
            raise ValueError("cross-attention needs kv (the encoder states), or their keys and values "
                             "cached by an earlier step (past_key_value, or a filled cache)")
        Hkv, D = self.Hkv, self.D
        if self.fused_qkv:
            k, v = self.kv_proj(kv).split([Hkv * D, Hkv * D], dim=-1)
        else:
            k, v = self.k_proj(kv), self.v_proj(kv)
        return self._heads(k, Hkv), self._heads(v, Hkv)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        H, Hkv, D = self.H, self.Hkv, self.D
        if self.fused_qkv:
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self._heads(q, H), self._heads(k, Hkv), self._heads(v, Hkv)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                attn_bias: Tensor | None) -> Tensor:
        p = self.dropout if self.training else 0.0
        if self.use_fused:
            return attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                             scale=self.scale, dropout_p=p)
        B, H, T, _ = q.shape
        keep = torch.rand(B, H, T, k.shape[2], device=q.device) >= p if p > 0 else None
        return reference.attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                                   attn_bias=attn_bias, scale=self.scale, dropout_keep=keep, dropout_p=p)

    def forward(self, x: Tensor, kv: Tensor | None = None, key_padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None, past_key_value: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, position_ids: Tensor | None = None, use_cache: bool = False):
        if past_key_value is not None and cache is not None:
            raise ValueError("pass either past_key_value or cache, not both")
        # The projections that read x and kv: q_proj or qkv_proj; k_proj or kv_proj (cross).
        x_proj = getattr(self, "q_proj", None) or getattr(self, "qkv_proj", None)
        kv_proj = getattr(self, "k_proj", None) or getattr(self, "kv_proj", None)
        for name, t, proj in (("x", x, x_proj), ("kv", kv, kv_proj)):
            if t is not None and t.dim() != 3:  # else the head split below fails with a q/k shape error
                raise ValueError(f"Attention: {name} must be (batch, length, hidden), got shape {tuple(t.shape)}")
            # (None for a projection wrapped by a PEFT layer without in_features: its own error then)
            width = getattr(proj, "in_features", None)
            if t is not None and width is not None and t.shape[-1] != width:  # else a matmul error
                raise ValueError(f"Attention: {name} must have width {width}, got shape {tuple(t.shape)}")
        past = past_key_value[0].shape[2] if past_key_value is not None else (cache.length if cache else 0)
        if self.cross:
            q = self._heads(self.q_proj(x), self.H)
            if past_key_value is not None:
                k, v = past_key_value
            elif cache is not None and past:
                k, v = cache.k[:, :, :past], cache.v[:, :, :past]
            else:
                k, v = self._project_kv(kv)
                if cache is not None:
                    k, v = cache.append(k, v)
        else:
            q, k, v = self._project(x)
            if self.rotary is not None:
                q, k = self.rotary(q, k, position_ids=position_ids, offset=past)
            if past_key_value is not None:
                k = torch.cat([past_key_value[0], k], dim=2)
                v = torch.cat([past_key_value[1], v], dim=2)
            elif cache is not None:
                k, v = cache.append(k, v)
        try:
            out = self._attend(q, k, v, key_padding_mask, attn_bias)
        except Exception:
            if cache is not None:  # e.g. a bad mask: a retry must not find these keys cached already
                cache.length = past
            raise
        out = self.o_proj(out.transpose(1, 2).flatten(2))  # (B, T, H * D)
        return (out, (k, v)) if use_cache else out
