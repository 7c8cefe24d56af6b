"""Pure-PyTorch references, shared by tests (in float64) and benchmarks (as the eager
baseline, in the benchmark dtype). They follow the Hugging Face implementations: reduced
precision inputs are upcast to float32 where HF does so."""

from __future__ import annotations

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
