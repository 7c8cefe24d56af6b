"""Task heads on any fastpt backbone (``Encoder`` or ``Decoder``).

``features(backbone, ...)`` gives per-token hidden states (B, T, d) from a chosen layer or
a learned mix of layers; the heads pool or project them:

- ``SequenceClassifier``: [CLS] (first token, through BERT's pooler when the backbone has
  one), mean over real tokens, or last real token (decoders); classification or regression;
- ``TokenClassifier``: a label per token (NER), -100 ignored;
- ``QuestionAnswering``: start/end logits per token, loss = mean of the two cross-entropies.

Text-to-text needs no head: ``prompt_masked_labels`` builds decoder labels that score only
the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpt.models import Decoder, Encoder

IGNORE_INDEX = -100
POOLINGS = ("cls", "mean", "last")


@dataclass
class HeadOutput:
    loss: Tensor | None
    logits: Tensor


def features(backbone: nn.Module, input_ids=None, attention_mask=None, *, layer: int = -1,
             inputs_embeds=None, token_type_ids=None) -> tuple[Tensor, tuple | None]:
    """Hidden states (B, T, d) after ``layer`` (-1: the last, normed for decoders), plus all
    layers' states when ``layer`` is not -1 (for layer mixing)."""
    every = layer != -1
    if isinstance(backbone, Encoder):
        last, hidden = backbone.encode(input_ids, attention_mask, token_type_ids,
                                       inputs_embeds=inputs_embeds, output_hidden_states=every)
    elif isinstance(backbone, Decoder):
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       output_hidden_states=every, logits_to_keep=1)
        last, hidden = out.last_hidden_state, out.hidden_states
    else:
        raise TypeError(f"task heads need a fastpt Encoder or Decoder backbone, got {type(backbone).__name__}")
    return (last if not every else hidden[layer]), hidden


class ScalarMix(nn.Module):
    """ELMo's learned mix of layers: gamma * sum_i softmax(w)_i h_i over the embeddings and
    every layer's output (feature-based transfer, Peters et al. 2018)."""

    def __init__(self, n: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, hidden: tuple) -> Tensor:
        w = torch.softmax(self.weights, 0)
        return self.gamma * sum(wi * h for wi, h in zip(w, hidden))


class _Head(nn.Module):
    """Shared by the heads: features from ``layer`` (an index, -1 = last, or "mix")."""

    def _init_features(self, backbone: nn.Module, layer) -> None:
        if not (layer == "mix" or isinstance(layer, int)):
            raise ValueError(f"layer must be an int or 'mix', got {layer!r}")
        self.backbone, self.layer = backbone, layer
        self.mix = ScalarMix(backbone.config.num_layers + 1) if layer == "mix" else None

    def _features(self, input_ids, attention_mask, **kw) -> Tensor:
        if self.mix is None:
            return features(self.backbone, input_ids, attention_mask, layer=self.layer, **kw)[0]
        _, hidden = features(self.backbone, input_ids, attention_mask, layer=0, **kw)
        return self.mix(hidden)


def pool(h: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """(B, T, d) -> (B, d) by the first token, the mean of real tokens, or the last real one
    (right padding)."""
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    if how == "cls":
        return h[:, 0]
    mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if attention_mask is None \
        else attention_mask.bool()
    if how == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    return h[torch.arange(h.shape[0], device=h.device), last]


class SequenceClassifier(_Head):
    """``num_labels`` classes (cross-entropy) or 1 output (regression, MSE)."""

    def __init__(self, backbone: nn.Module, num_labels: int, *, pooling: str | None = None,
                 layer: int | str = -1, dropout: float = 0.1):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self._init_features(backbone, layer)
        self.pooling = pooling or ("cls" if isinstance(backbone, Encoder) else "last")
        pool(torch.zeros(1, 1, 1), None, self.pooling)  # validates the name early
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw) -> HeadOutput:
        h = self._features(input_ids, attention_mask, **kw)
        pooled = pool(h, attention_mask, self.pooling)
        if self.pooling == "cls" and isinstance(self.backbone, Encoder) and self.layer == -1:
            pooled = torch.tanh(self.backbone.pooler(pooled))  # BERT's pre-trained pooler
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return HeadOutput(loss, logits)


class TokenClassifier(_Head):
    def __init__(self, backbone: nn.Module, num_labels: int, *, layer: int | str = -1, dropout: float = 0.1):
        super().__init__()
        self._init_features(backbone, layer)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw) -> HeadOutput:
        h = self._features(input_ids, attention_mask, **kw)
        logits = self.classifier(self.dropout(h))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=IGNORE_INDEX)
        return HeadOutput(loss, logits)


class QuestionAnswering(_Head):
    """Extractive QA: logits (B, T, 2) for answer start and end token."""

    def __init__(self, backbone: nn.Module, *, layer: int | str = -1):
        super().__init__()
        self._init_features(backbone, layer)
        self.qa_outputs = nn.Linear(backbone.config.hidden_size, 2)

    def forward(self, input_ids=None, attention_mask=None, start_positions=None,
                end_positions=None, **kw) -> HeadOutput:
        h = self._features(input_ids, attention_mask, **kw)
        logits = self.qa_outputs(h)
        if attention_mask is not None:  # never predict a padding position
            logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(logits.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (nn.functional.cross_entropy(logits[..., 0].float(), start_positions)
                    + nn.functional.cross_entropy(logits[..., 1].float(), end_positions)) / 2
        return HeadOutput(loss, logits)


def prompt_masked_labels(prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int,
                         eos_id: int | None = None) -> dict:
    """Decoder text-to-text batch: ``prompt + answer (+ EOS)``, labels -100 on the prompt and
    on padding only. The real EOS keeps its label even when pad == EOS (padding is found by
    position, not by id)."""
    rows, labels = [], []
    for p, a in zip(prompt_ids, answer_ids):
        answer = list(a) + ([eos_id] if eos_id is not None else [])
        rows.append(list(p) + answer)
        labels.append([IGNORE_INDEX] * len(p) + answer)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(r)] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
