"""Pure-PyTorch references, shared by tests (in float64) and benchmarks (as the eager
baseline, in the benchmark dtype). They follow the Hugging Face implementations: reduced
precision inputs are upcast to float32 where HF does so."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """HF LlamaRMSNorm: normalise in float32 (or float64), scale by weight in x's dtype."""
    h = _upcast(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Llama MLP activation: silu(gate) * up."""
    return F.silu(gate) * up


def rope_tables(positions: int, rotary_dim: int, base: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape (positions, rotary_dim // 2), theta_i = base^(-2i/rotary_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x: Tensor) -> Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope_one(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        out = xr * c + _rotate_interleaved(xr) * s
    else:
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        out = xr * c + _rotate_half(xr) * s
    return torch.cat((out.to(x.dtype), xp), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None,
         layout: str = "half") -> tuple[Tensor, Tensor]:
    """HF apply_rotary_pos_emb on (..., T, D) tensors with (P, R) tables; see fastpt.ops.rope."""
    T = q.shape[-2]
    pos = torch.arange(T, device=q.device) if position_ids is None else position_ids.long()
    c, s = cos[pos].to(q.dtype), sin[pos].to(q.dtype)  # (T, R) or (B, T, R)
    if c.dim() == 3 and q.dim() == 4:  # (B, T, R) -> (B, 1, T, R) to broadcast over heads
        c, s = c.unsqueeze(1), s.unsqueeze(1)
    interleaved = layout == "interleaved"
    return _rope_one(q, c, s, interleaved), _rope_one(k, c, s, interleaved)


def _u64(x: int) -> int:
    """Python int -> the int64 with the same low 64 bits (torch has no uint64 arithmetic)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def attention_dropout_keep(seed: int, B: int, H: int, T: int, S: int, p: float) -> Tensor:
    """(B, H, T, S) bool: which attention probabilities fastpt.ops.attention keeps for this seed
    (the counter-based hash of csrc/ops/attention/attention.h, in int64 arithmetic)."""
    row = torch.arange(B * H * T, dtype=torch.int64)
    z = (row ^ _u64(seed)) + _u64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _u64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _u64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    lo, hi = (z & 0xFFFFFFFF)[:, None], _shr(z, 32)[:, None]
    j = torch.arange(S, dtype=torch.int64)[None, :]
    h = _fmix32(_fmix32(j ^ lo) ^ hi)
    threshold = min(int(p * 4294967296.0), 4294967295)
    return (h >= threshold).view(B, H, T, S)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Tensor | None = None,
              attn_bias: Tensor | None = None, scale: float | None = None,
              dropout_keep: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Naive attention (matmul, softmax, matmul) with fastpt.ops.attention's semantics: GQA by
    repeating kv heads, bottom-right causal alignment, rows without keys give 0.
    ``dropout_keep`` (B, H, T, S) bool applies that dropout mask with rate ``dropout_p``."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        logits = logits + attn_bias.to(logits.dtype)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.ones_like(visible).tril(S - T)
    visible = visible.expand(B, 1, T, S)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    empty = ~visible.any(-1, keepdim=True)  # rows without keys: probabilities 0, no NaN
    logits = logits.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return probs @ v
