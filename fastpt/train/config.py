"""``TrainerConfig``: every knob of the training loop, validated when built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from fastpt.train.schedules import SCHEDULES

STRATEGIES = ("auto", "single", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")  # auto: where the model is (on a GPU: each process's, LOCAL_RANK)
# The seeds torch takes are 64-bit, and a DataLoader's is seed * 1000 + epoch: a seed beyond this
# failed at the first batch with "Overflow when unpacking long long", naming nothing.
SEED_LIMIT = 2**53


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
    keep_last: int = 2              # 0: keep every checkpoint
    strategy: str = "auto"          # auto = ddp under torchrun with >1 process, else single
    device: str = "auto"            # auto = where the model is (a GPU: cuda:LOCAL_RANK); cpu; cuda
    progress: bool = True
    num_workers: int = 0
    steady_alloc: bool = False      # keep freed memory in the process (fastpt.alloc.use_steady_allocator)

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
        for name in ("bf16", "activation_checkpointing", "progress", "steady_alloc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainerConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("output_dir", "schedule", "strategy", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TrainerConfig.{name} must be a string, got {getattr(self, name)!r}")
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"TrainerConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            raise ValueError(f"TrainerConfig.seed must lie in [-2**53, 2**53), got {self.seed}")
        if not self.output_dir:  # os.makedirs("") fails with "No such file or directory: ''"
            raise ValueError("TrainerConfig.output_dir must name a folder, got ''")
        if self.warmup_steps > self.max_steps:
            # The lr would still be warming up at the last step: it never reaches lr, nor decays.
            raise ValueError(f"TrainerConfig.warmup_steps ({self.warmup_steps}) must be <= max_steps "
                             f"({self.max_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainerConfig.lr must be a finite number > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):  # also rejects NaN
            raise ValueError(f"TrainerConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.lr * self.weight_decay >= 1:
            # AdamW multiplies the weights by 1 - lr * weight_decay at every step: at or below 0
            # they are zeroed or flip sign and grow, and the run trains on regardless.
            raise ValueError(f"TrainerConfig.lr x weight_decay must be < 1 (AdamW scales the weights by "
                             f"1 - lr x weight_decay each step), got {self.lr} x {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainerConfig.schedule {self.schedule!r} not in {SCHEDULES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"TrainerConfig.strategy {self.strategy!r} not in {STRATEGIES}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainerConfig.device {self.device!r} not in {DEVICES}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerConfig":
        if not isinstance(d, dict):
            raise TypeError(f"TrainerConfig.from_dict needs a dict of options, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainerConfig options: {unknown}")
        return cls(**d)
