"""Small parameter-efficient modules: bottleneck adapters, IA3 scaling, soft prompts.

- ``BottleneckAdapter`` (Houlsby et al. 2019): h + up(act(down(h))), d -> d/reduction -> d,
  near-identity init (small normal weights, zero biases), inserted after a sub-layer's output
  and before its residual add.
- ``IA3Scale`` (Liu et al. 2022): a learned vector, init 1, multiplying a linear layer's
  output (keys, values) or input (the FFN's down projection).
- ``SoftPrompt`` (Lester et al. 2021): n trainable embeddings prepended to the input
  embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BottleneckAdapter(nn.Module):
    def __init__(self, d: int, reduction: int = 16, init_std: float = 1e-3):
        super().__init__()
        hidden = max(1, d // reduction)
        self.down, self.up = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """``adapter(module(...))``: a sub-layer followed by its adapter (keys ``module.*``)."""

    def __init__(self, module: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.module, self.adapter = module, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.module(*args, **kwargs))


class IA3Linear(nn.Module):
    """A frozen linear whose output (``on="output"``) or input (``on="input"``) is scaled
    by a learned vector initialised to ones."""

    def __init__(self, base: nn.Module, on: str):
        super().__init__()
        if on not in ("input", "output"):
            raise ValueError(f"IA3 scales 'input' or 'output', got {on!r}")
        self.base, self.on = base, on
        width = base.in_features if on == "input" else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(width, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.on == "input":
            return self.base(x * self.ia3_l)
        return self.base(x) * self.ia3_l


class SoftPrompt(nn.Module):
    """n virtual token embeddings (n, d), initialised from given embedding rows."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().clone())

    def insert(self, embeds: Tensor, attention_mask: Tensor, at: int) -> tuple[Tensor, Tensor]:
        """Insert the prompt at position ``at`` of (B, T, d) embeddings; the mask marks the
        virtual tokens real. (Other per-token inputs: ``PromptTuned``.)"""
        B, n = embeds.shape[0], self.embeddings.shape[0]
        prompt = self.embeddings.to(embeds.dtype).expand(B, -1, -1)
        x = torch.cat([embeds[:, :at], prompt, embeds[:, at:]], 1)
        mask = torch.cat([attention_mask[:, :at], attention_mask.new_ones(B, n), attention_mask[:, at:]], 1)
        return x, mask
