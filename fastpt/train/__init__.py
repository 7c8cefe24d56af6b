"""Training: the Trainer loop, its config, schedules, checkpoints and torch.distributed setup."""

from fastpt.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastpt.train.config import TrainerConfig
from fastpt.train.trainer import Trainer, enable_activation_checkpointing, seed_everything

__all__ = ["CheckpointError", "Trainer", "TrainerConfig", "enable_activation_checkpointing",
           "load_checkpoint", "save_checkpoint", "seed_everything"]
