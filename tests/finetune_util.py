"""The tiny backbones, batch and training steps the fine-tuning tests share."""

import torch

from fastpt.finetune.lora import LoraLayer
from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig

V = 120


def _backbone(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=V, dropout=0.0, attention_dropout=0.0))
    return Decoder(DecoderConfig.from_name(f"{kind}-tiny", vocab_size=V))


def _batch(B=4, T=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -3:] = False
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])[:B]}


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        loss = model(**_batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
