"""Fine-tuning strategies side by side: the same pre-trained backbone adapted with each
strategy on the same labelled set, then scored on the same test set (one row per strategy:
test accuracy, trainable parameters, training time, median step time, peak memory of a step).

Used by ``fastpt demo`` and ``python -m fastpt.benchmarks.finetune``.
"""

from __future__ import annotations

import statistics
import time

import torch

from fastpt.alloc import peak_memory_bytes
from fastpt.data.datasets import encode_padded
from fastpt.finetune.heads import SequenceClassifier
from fastpt.finetune.strategies import FinetuneConfig, count_parameters, prepare

SCRATCH = "full, from scratch"
"""The strategy name of the baseline row: full fine-tuning of freshly initialised weights."""

# Settings that suit the tiny presets: one frozen layer for "partial", small LoRA rank,
# adapters and virtual tokens.
DEFAULT_CONFIG = dict(freeze_layers=1, lora_r=4, num_virtual_tokens=8, prefix_length=8,
                      adapter_reduction=4)


def default_lr(strategy: str) -> float:
    """Whole-network strategies take a smaller step than those training a few parameters."""
    return 1e-3 if strategy in ("full", "partial", SCRATCH) else 3e-3


def _copy(base: torch.nn.Module, fresh: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = type(base)(base.config)   # fresh weights, same architecture
    if not fresh:
        model.load_state_dict(base.state_dict())
    return model


def _accuracy(model, tokenizer, test: list[dict], pad: int, batch_size: int = 256) -> float:
    ids, mask = encode_padded(tokenizer, [e["text"] for e in test], pad)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(input_ids=i, attention_mask=m).logits.argmax(-1)
                          for i, m in zip(ids.split(batch_size), mask.split(batch_size))])
    return float((pred == torch.tensor([e["label"] for e in test])).float().mean())


def finetune_strategy(base, tokenizer, strategy: str, train: list[dict], test: list[dict], *,
                      epochs: int, lr: float | None = None, batch_size: int = 16, seed: int = 0,
                      progress=None) -> dict:
    """Fine-tune a copy of ``base`` (never ``base`` itself) as a 2-class sequence classifier
    with ``strategy`` (one of ``STRATEGIES``, or :data:`SCRATCH` for full fine-tuning of
    fresh weights) on ``train`` ({"text", "label"}) and score it on ``test``.

    ``progress``: a tqdm bar (or anything with ``update(n)``) advanced once per step.
    Returns {"strategy", "accuracy", "trainable", "trainable_pct", "train_s", "step_ms",
    "peak_mib"}. Raises ValueError for an unknown strategy or an empty set.
    """
    if not train or not test:
        raise ValueError(f"need labelled train and test examples, got {len(train)} and {len(test)}")
    lr = default_lr(strategy) if lr is None else lr
    backbone = _copy(base, strategy == SCRATCH, seed)
    cfg = FinetuneConfig(strategy="full" if strategy == SCRATCH else strategy, **DEFAULT_CONFIG)
    model = prepare(SequenceClassifier(backbone, 2, dropout=0.0), cfg)
    pad = base.config.pad_token_id or 0
    ids, mask = encode_padded(tokenizer, [e["text"] for e in train], pad)
    labels = torch.tensor([e["label"] for e in train])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def step(idx):
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    times = []
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            start = time.perf_counter()
            step(idx)
            times.append(time.perf_counter() - start)
            if progress is not None:
                progress.update(1)
    accuracy = _accuracy(model, tokenizer, test, pad)  # before the step below, which trains too
    model.train()
    peak = peak_memory_bytes(lambda: step(torch.arange(min(batch_size, len(train)))))
    counts = count_parameters(model)
    return {"strategy": strategy, "accuracy": accuracy,
            "trainable": counts["trainable"], "trainable_pct": counts["percent"],
            "train_s": sum(times), "step_ms": 1000 * statistics.median(times),
            "peak_mib": peak / 2**20}


def steps_per_run(n_train: int, epochs: int, batch_size: int = 16) -> int:
    """Optimizer steps of one :func:`finetune_strategy` run (for progress bars)."""
    return epochs * -(-n_train // batch_size)


def compare_strategies(base, tokenizer, strategies, train: list[dict], test: list[dict], *,
                       epochs: int, scratch: bool = True, seed: int = 0, progress=None,
                       on_row=None) -> list[dict]:
    """:func:`finetune_strategy` for each of ``strategies`` (each from the same weights),
    then, with ``scratch``, the :data:`SCRATCH` baseline. ``on_row(row)`` is called as each
    row is ready."""
    rows = []
    for strategy in (*strategies, *((SCRATCH,) if scratch else ())):
        row = finetune_strategy(base, tokenizer, strategy, train, test, epochs=epochs, seed=seed,
                                progress=progress)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
