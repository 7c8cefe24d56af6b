"""The TrainerConfig and the weights snapshot that the single-process Trainer loop tests share."""

import torch

from fastpt.train import TrainerConfig


def _config(out, **overrides):
    cfg = dict(output_dir=str(out), max_steps=1, batch_size=8, lr=1e-2, label_shift=1, progress=False,
               max_grad_norm=None, schedule="constant", log_every=1)
    cfg.update(overrides)
    return TrainerConfig(**cfg)


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
