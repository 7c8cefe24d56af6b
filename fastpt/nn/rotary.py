"""Rotary position embedding with a cached cos/sin table."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastpt._memory import physical_memory
from fastpt.ops import reference
from fastpt.ops.rope import rope


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (B, H, T, D) queries and keys.

    Args:
        dim: rotary dims (<= head dim; the rest of each head passes through).
        max_position_embeddings: rows of the cos/sin cache; grown on demand.
        base: theta base (Llama: 10000; Llama 3: 500000).
        layout: "half" (Llama/NeoX) or "interleaved" (GPT-J).
        use_fused: False runs the pure-PyTorch reference instead (for A/B checks).

    The cos/sin tables stay float32 whatever dtype the module is moved to (float64 in a
    float64 module); the fused rope rotates bf16/fp16 q and k with them in float32.

    Context-length scaling (NTK, YaRN, Llama 3) is not implemented yet.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 2048, base: float = 10000.0,
                 layout: str = "half", device=None, use_fused: bool = True):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if layout not in ("half", "interleaved"):
            raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
        # base 0 or < 0 made every angle NaN, with no error
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf:
            raise ValueError(f"base must be a finite number > 0, got {base!r}")
        if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int) \
                or max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be an int >= 1, got {max_position_embeddings!r}")
        self.dim, self.base, self.layout, self.use_fused = dim, base, layout, use_fused
        self._build(max_position_embeddings, device, torch.float32)

    def _build(self, positions: int, device, dtype: torch.dtype) -> None:
        cos, sin = reference.rope_tables(positions, self.dim, self.base, dtype=dtype)
        # Buffers, not parameters: moved by .to(), never saved (they are recomputed).
        self.register_buffer("cos_cached", cos.to(device), persistent=False)
        self.register_buffer("sin_cached", sin.to(device), persistent=False)

    def _grow(self, needed: int) -> None:
        """Tables for positions [0, needed), doubled at least; a position id so large that its
        table would not fit in memory is named (it was an allocator error of petabytes)."""
        table_bytes = 2 * needed * (self.dim // 2) * self.cos_cached.element_size()
        if self.cos_cached.device.type == "cpu" and table_bytes > physical_memory():
            raise ValueError(f"position {needed - 1} needs rotary tables of {table_bytes / 2**30:.0f} GiB, "
                             f"more than this machine's memory: position ids must be token positions")
        self._build(max(needed, 2 * self.cos_cached.shape[0]), self.cos_cached.device, self.cos_cached.dtype)

    def _apply(self, fn, recurse=True):
        tables = self.cos_cached, self.sin_cached
        out = super()._apply(fn, recurse)
        dtype, device = self.cos_cached.dtype, self.cos_cached.device
        if dtype == torch.float64 and tables[0].dtype != torch.float64:
            # Upcast float32 tables hold float32's precision only: recompute them (on the
            # device, so a meta module allocates nothing).
            with torch.device(device):
                self._build(self.cos_cached.shape[0], device, torch.float64)
        elif dtype not in (torch.float32, torch.float64):
            # .half()/.bfloat16() would round the tables for good (a later .float() or
            # load_state_dict does not recompute them): keep them float32, which rope takes
            # with q of any dtype.
            self.cos_cached, self.sin_cached = (t.to(device, torch.float32) for t in tables)
        return out

    def forward(self, q: Tensor, k: Tensor, position_ids: Tensor | None = None,
                offset: int = 0) -> tuple[Tensor, Tensor]:
        """q: (B, H, T, D), k: (B, Hkv, T, D). Positions are ``position_ids`` if given, else
        ``offset + arange(T)`` (``offset`` = tokens already in the KV cache)."""
        if q.dim() < 2:  # rope names the expected layout
            return rope(q, k, self.cos_cached, self.sin_cached, position_ids, layout=self.layout)
        T = q.shape[-2]
        needed = T
        if position_ids is None and offset:
            position_ids = torch.arange(offset, offset + T, device=q.device)
            needed = offset + T
        elif position_ids is not None and position_ids.numel() and not torch.compiler.is_compiling():
            # (a value compiled code cannot read: there the op checks the range itself, and the
            # table must be large enough already)
            needed = int(position_ids.max()) + 1
        if needed > self.cos_cached.shape[0]:
            self._grow(needed)
        apply = rope if self.use_fused else reference.rope
        return apply(q, k, self.cos_cached, self.sin_cached, position_ids, layout=self.layout)
