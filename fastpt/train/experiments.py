"""Learning-outcome experiments: does pre-training pay off? (README records the results.)

``sentiment_transfer``: pre-train a tiny encoder with MLM on the world corpus, then fine-tune
it on a few hundred labelled reviews; compare with the same encoder fine-tuned from random
weights. The labelled reviews use half of the adjectives and the test reviews the other half,
so the polarity of the test adjectives can only come from pre-training, where they co-occur
with "will come back" / "will never return". (On the same adjectives, 200 labels are enough
for both models: measured 98.2% pre-trained vs 100% from scratch.)

``digits`` lives in :mod:`fastpt.pretrain.autoencoder` (``digits_experiment``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastpt.data.world import World
from fastpt.models import Encoder
from fastpt.data.datasets import encode_padded
from fastpt._checks import check_bool, check_int


class _Classifier(nn.Module):
    """[CLS] pooler output -> linear, the BERT recipe for sequence classification."""

    def __init__(self, encoder: Encoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        x, _ = self.encoder.encode(input_ids, attention_mask)
        return self.head(torch.tanh(self.encoder.pooler(x[:, 0])))


def _check_reviews(name: str, reviews) -> None:
    """A non-empty list of {"text": str, "label": 0 or 1}: an empty one failed as "cannot
    collate an empty batch", a label 2 or 0.5 inside cross_entropy."""
    if not isinstance(reviews, (list, tuple)) or not reviews:
        raise ValueError(f"{name} must be a non-empty list of {{'text', 'label'}} examples, got "
                         f"{reviews!r:.60}")
    for i, e in enumerate(reviews):
        if not isinstance(e, dict) or not isinstance(e.get("text"), str):
            raise ValueError(f"{name}[{i}] must be {{'text': str, 'label': 0 or 1}}, got {e!r:.80}")
        if type(e.get("label")) is not int or e["label"] not in (0, 1):  # type: a bool is no class id
            raise ValueError(f"{name}[{i}]['label'] must be 0 or 1, got {e.get('label')!r}")


def _check_fine_tuning(train, test, epochs, lr, batch_size, seed, freeze_embeddings) -> None:
    _check_reviews("train", train)
    _check_reviews("test", test)
    check_int("epochs", epochs, minimum=0)
    check_int("batch_size", batch_size, minimum=1)  # True passed as 1, 0 failed inside split()
    check_int("seed", seed)
    check_bool("freeze_embeddings", freeze_embeddings)  # "no" froze them
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def fine_tune_accuracy(encoder: Encoder, tok, train: list, test: list, *, epochs: int = 30,
                       lr: float = 5e-4, batch_size: int = 32, seed: int = 0,
                       freeze_embeddings: bool = True) -> float:
    """Fine-tune on ``train`` ({"text", "label"}) and return test accuracy. With
    ``freeze_embeddings`` the embedding layer stays as it is: a few hundred labels would
    otherwise move only the embeddings of the words they contain, away from the words
    they do not."""
    _check_fine_tuning(train, test, epochs, lr, batch_size, seed, freeze_embeddings)
    torch.manual_seed(seed)
    pad = encoder.config.pad_token_id or 0
    for p in encoder.embeddings.parameters():
        p.requires_grad_(not freeze_embeddings)
    model = _Classifier(encoder, 2)
    ids, mask = encode_padded(tok, [e["text"] for e in train], pad)
    labels = torch.tensor([e["label"] for e in train])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(model(ids[idx], mask[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ids, mask = encode_padded(tok, [e["text"] for e in test], pad)
    with torch.no_grad():
        predictions = torch.cat([model(i, m).argmax(-1) for i, m in zip(ids.split(256), mask.split(256))])
    return float((predictions == torch.tensor([e["label"] for e in test])).float().mean())


def sentiment_transfer(output_dir: str, *, n_labels: int = 200, n_test: int = 1000,
                       pretrain_steps: int = 3000, seed: int = 0, progress: bool = True) -> dict:
    """Test accuracy on unseen adjectives of pre-trained vs randomly initialised tiny
    encoders fine-tuned on ``n_labels`` reviews, with the embedding layer frozen (the
    recipe) and with every weight trained (for comparison)."""
    # Before the pre-training (minutes): an empty set failed only after it.
    check_int("n_labels", n_labels, minimum=1)
    check_int("n_test", n_test, minimum=1)
    from fastpt.train.recipes import pretrain_encoder
    world = World(seed)
    result = pretrain_encoder(output_dir, world=world, max_steps=pretrain_steps, seed=seed,
                              progress=progress)
    train = world.sentiment(n_labels, seed=1, adjectives="seen")
    test = world.sentiment(n_test, seed=2, adjectives="unseen")
    weights = {k: v.clone() for k, v in result.model.state_dict().items()}
    out = {"n_labels": n_labels, "pretrain_steps": pretrain_steps,
           "final_mlm_loss": result.metrics[-1]["loss"]}
    for recipe, freeze in (("frozen_embeddings", True), ("full", False)):
        pretrained = Encoder(result.model.config)
        pretrained.load_state_dict(weights)
        torch.manual_seed(seed)
        scratch = Encoder(result.model.config)
        accs = {name: fine_tune_accuracy(m, result.tokenizer, train, test, seed=seed,
                                         freeze_embeddings=freeze)
                for name, m in (("pretrained", pretrained), ("scratch", scratch))}
        out[recipe] = {**accs, "gain_points": 100 * (accs["pretrained"] - accs["scratch"])}
    return out


def main(argv=None) -> int:
    """``python -m fastpt.train.experiments [--out DIR] [--json PATH] [--only ...]``."""
    import argparse
    import json
    import time
    from fastpt.pretrain.autoencoder import digits_experiment
    p = argparse.ArgumentParser(description="learning-outcome experiments (slow: minutes)")
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--json")
    p.add_argument("--only", choices=("sentiment", "digits"))
    args = p.parse_args(argv)
    results = {}
    if args.only in (None, "sentiment"):
        start = time.perf_counter()
        results["sentiment_transfer"] = sentiment_transfer(args.out + "/sentiment", progress=False)
        results["sentiment_transfer"]["seconds"] = time.perf_counter() - start
    if args.only in (None, "digits"):
        start = time.perf_counter()
        results["digits"] = digits_experiment()
        results["digits"]["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
