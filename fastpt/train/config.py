"""``TrainerConfig``: every knob of the training loop, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fastpt.train.schedules import SCHEDULES

STRATEGIES = ("auto", "single", "ddp", "fsdp")


@dataclass
class TrainerConfig:
    output_dir: str = "runs/train"
    max_steps: int = 100
    batch_size: int = 8             # examples per micro-batch on each process
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool = False              # torch.autocast(bfloat16) around forward and loss
    activation_checkpointing: bool = False
    label_shift: int = 0            # 1 for models that shift labels inside (causal LM)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0             # 0: only at the end (when eval data is given)
    save_every: int = 0             # 0: only at the end
    keep_last: int = 2
    strategy: str = "auto"          # auto = ddp under torchrun with >1 process, else single
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        positive = ("max_steps", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TrainerConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "label_shift", "num_workers",
                     "seed"):
            if not is_int(getattr(self, name)) or (name != "seed" and getattr(self, name) < 0):
                raise ValueError(f"TrainerConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"TrainerConfig.{name} must be a number, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and not is_number(self.max_grad_norm):
            raise ValueError(f"TrainerConfig.max_grad_norm must be a number or None, got {self.max_grad_norm!r}")
        for name in ("bf16", "activation_checkpointing", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainerConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("output_dir", "schedule", "strategy"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TrainerConfig.{name} must be a string, got {getattr(self, name)!r}")
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"TrainerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainerConfig.lr must be a finite number > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):  # also rejects NaN
            raise ValueError(f"TrainerConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainerConfig.schedule {self.schedule!r} not in {SCHEDULES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TrainerConfig.strategy {self.strategy!r} not in {STRATEGIES}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainerConfig options: {unknown}")
        return cls(**d)
