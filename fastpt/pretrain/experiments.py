"""Learning-outcome experiments: does pre-training pay off? (README records the results.)

``sentiment_transfer``: pre-train a tiny encoder with MLM on the world corpus, then fine-tune
it on a few hundred labelled reviews; compare with the same encoder fine-tuned from random
weights. The review adjectives are many and each labelled example shows only two, so the
polarity of most test adjectives must come from pre-training, where they co-occur with
"will come back" / "will never return".

``digits`` lives in :mod:`fastpt.pretrain.autoencoder` (``digits_experiment``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastpt.data.world import World
from fastpt.models import Encoder
from fastpt.pretrain.mlm import pad_batch


class _Classifier(nn.Module):
    """[CLS] pooler output -> linear, the BERT recipe for sequence classification."""

    def __init__(self, encoder: Encoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        x, _ = self.encoder.encode(input_ids, attention_mask)
        return self.head(torch.tanh(self.encoder.pooler(x[:, 0])))


def _encode(tok, texts, pad_id):
    return pad_batch([e.ids for e in tok.encode_batch(texts)], pad_id)


def fine_tune_accuracy(encoder: Encoder, tok, train: list, test: list, *, epochs: int = 30,
                       lr: float = 5e-4, batch_size: int = 32, seed: int = 0) -> float:
    """Fine-tune every weight on ``train`` ({"text", "label"}) and return test accuracy."""
    torch.manual_seed(seed)
    pad = encoder.config.pad_token_id or 0
    model = _Classifier(encoder, 2)
    ids, mask = _encode(tok, [e["text"] for e in train], pad)
    labels = torch.tensor([e["label"] for e in train])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(model(ids[idx], mask[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ids, mask = _encode(tok, [e["text"] for e in test], pad)
    with torch.no_grad():
        predictions = torch.cat([model(i, m).argmax(-1) for i, m in zip(ids.split(256), mask.split(256))])
    return float((predictions == torch.tensor([e["label"] for e in test])).float().mean())


def sentiment_transfer(output_dir: str, *, n_labels: int = 200, n_test: int = 1000,
                       pretrain_steps: int = 600, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy of pre-trained vs randomly initialised tiny encoders after fine-tuning on
    ``n_labels`` reviews."""
    from fastpt.pretrain.recipes import pretrain_encoder
    world = World(seed)
    result = pretrain_encoder(output_dir, world=world, max_steps=pretrain_steps, seed=seed,
                              progress=progress)
    train = world.sentiment(n_labels, seed=1)
    test = world.sentiment(n_test, seed=2)
    pretrained = fine_tune_accuracy(result.model, result.tokenizer, train, test, seed=seed)
    torch.manual_seed(seed)
    scratch = fine_tune_accuracy(Encoder(result.model.config), result.tokenizer, train, test, seed=seed)
    return {"n_labels": n_labels, "pretrain_steps": pretrain_steps,
            "final_mlm_loss": result.metrics[-1]["loss"], "accuracy_pretrained": pretrained,
            "accuracy_scratch": scratch, "gain_points": 100 * (pretrained - scratch)}
