"""The tiny classifier and the adapter save and load that the fine-tuning file tests share."""

import torch

from fastpt.finetune import FinetuneConfig, SequenceClassifier, load_adapter, prepare, save_adapter
from fastpt.models import Decoder, DecoderConfig

V = 120


def _backbone():
    torch.manual_seed(0)
    return Decoder(DecoderConfig.from_name("gpt2-tiny", vocab_size=V))


def _ids():
    return torch.randint(5, V, (2, 7), generator=torch.Generator().manual_seed(1))


def _adapter(path, seed=0, **settings):
    """A prepared classifier with trained-looking (random) tensors, saved to ``path``."""
    cfg = FinetuneConfig(**{"strategy": "lora", "lora_r": 2, **settings})
    model = prepare(SequenceClassifier(_backbone(), 2), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, str(path), cfg)
    return model.eval()


def _load(path):
    return load_adapter(SequenceClassifier(_backbone(), 2), str(path)).eval()
