"""Static, preallocated key/value caches for generation.

One buffer per cache for all layers, (L, B, Hkv, max_len, D), allocated once; each step
writes its keys/values at [length, length + T) and attends over the view [:length + T].
Every row of the batch has the same length: batched prompts are left-padded, and the pad
positions are masked by the attention mask rather than removed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastpt._memory import physical_memory


def _check_fits_in_memory(shape: tuple, dtype: torch.dtype, device) -> None:
    """Keys and values of ``shape`` larger than the device's memory: a ValueError naming the
    length, not an allocator error (or, with overcommit, the OOM killer) mid-way."""
    need = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        have = physical_memory()
    elif device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        return
    if need > have:
        raise ValueError(f"a KV cache of max_length {shape[3]} for batch {shape[1]} needs {need / 2**30:.1f} GiB, "
                         f"more than the {have / 2**30:.1f} GiB of {device.type} memory: lower the length "
                         "(max_new_tokens when generating) or the batch")


class KVCache:
    """Self-attention cache. Layers call :meth:`update`; the model calls :meth:`advance`
    once all layers have seen the step's tokens."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float32, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        _check_fits_in_memory(shape, dtype, device)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        # Leading tokens that are not the input's: prompt tuning's soft tokens, which its
        # wrapper puts in and checks for before it adds to the cache.
        self.soft_prompt_tokens = 0

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, Hkv, T, D) keys/values of this step; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            # a forward's use_cache=True cache is sized to its input: decoding needs room
            raise ValueError(f"KV cache full: {end} tokens > max_length {self.max_length}; for decoding, "
                             "start from model.new_cache(batch_size, max_length) with room for the new tokens")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def fill_from(self, context: "KVCache") -> None:
        """Start every row with the tokens of the one-row cache ``context`` (a shared prompt
        scored against several continuations)."""
        L = context.length
        if context.batch_size != 1 or L > self.max_length:
            raise ValueError(f"fill_from takes a one-row cache of at most {self.max_length} tokens, got "
                             f"{context.batch_size} rows of {L}")
        self.k[:, :, :, :L] = context.k[:, :, :, :L]
        self.v[:, :, :, :L] = context.v[:, :, :, :L]
        self.length, self.soft_prompt_tokens = L, context.soft_prompt_tokens

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place."""
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))


class Seq2SeqCache:
    """Encoder-decoder cache: the decoder's self-attention :class:`KVCache` plus each
    layer's cross-attention keys/values, computed from the encoder output on the first
    step and reused after."""

    def __init__(self, self_attention: KVCache):
        self.self_attention = self_attention
        self.cross: list[tuple[Tensor, Tensor] | None] = [None] * self_attention.k.shape[0]

    @property
    def length(self) -> int:
        return self.self_attention.length

    def reorder(self, index: Tensor) -> None:
        self.self_attention.reorder(index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]
