"""Optimizer construction (AdamW with weight-decay groups) and learning-rate schedules."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm weights and other 1-D parameters get no decay
    (as in BERT, GPT-2 and nanoGPT). Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Multiplier of the base lr at a step: linear warmup, then cosine/linear decay to
    ``min_ratio`` at ``total_steps`` (or constant)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    for name, value, low in (("warmup_steps", warmup_steps, 0), ("total_steps", total_steps, 1)):
        # A float warmup gave fractional multipliers, True a warmup of one step.
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be a number in [0, 1], got {min_ratio!r}")  # 2.0 decayed up to 2 x lr

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape
    return multiplier
