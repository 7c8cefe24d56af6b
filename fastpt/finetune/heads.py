"""Task heads on any fastpt backbone (``Encoder`` or ``Decoder``).

``features(backbone, ...)`` gives per-token hidden states (B, T, d) from a chosen layer or
a learned mix of layers; the heads pool or project them:

- ``SequenceClassifier``: [CLS] (first token, through BERT's pooler when the backbone has
  one), mean over real tokens, or last real token (decoders); classification or regression;
- ``TokenClassifier``: a label per token (NER), -100 ignored;
- ``QuestionAnswering``: start/end logits per token, loss = mean of the two cross-entropies.

Labels and answer positions are checked against the logits (shape, integers, range) with
messages that name them; values are read on the CPU only, as in ``fastpt.models.common``
(on a GPU each check would cost a sync per call).

Text-to-text needs no head: ``prompt_masked_labels`` builds decoder labels that score only
the answer; a ``Seq2Seq`` takes its targets as ``labels`` (heads refuse it at construction).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastpt.models import Decoder, Encoder, Seq2Seq
from fastpt.models.common import check_labels

IGNORE_INDEX = -100
POOLINGS = ("cls", "mean", "last")


@dataclass
class HeadOutput:
    loss: Tensor | None
    logits: Tensor


def features(backbone: nn.Module, input_ids=None, attention_mask=None, *, layer: int = -1,
             inputs_embeds=None, token_type_ids=None) -> tuple[Tensor, tuple | None]:
    """Hidden states (B, T, d) after ``layer`` (an index into the embeddings and each layer's
    output, as ``hidden_states``; -1: the last, normed for decoders), plus those of the
    embeddings and every layer up to ``layer`` when it is not -1 (for layer mixing). Layers
    above ``layer`` are not run."""
    check_backbone(backbone)
    every = layer != -1
    n = _layers_up_to(backbone, layer)
    if isinstance(backbone, Encoder):
        last, hidden = backbone.encode(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds,
                                       output_hidden_states=every, num_layers=n)
    else:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       output_hidden_states=every, logits_to_keep=1, num_layers=n)
        last, hidden = out.last_hidden_state, out.hidden_states
    return (last if not every else hidden[n]), hidden


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a task head; a bare model is its own."""
    return getattr(model, "backbone", model)


def check_backbone(backbone: nn.Module) -> None:
    """TypeError unless ``backbone`` is an Encoder or Decoder, the models ``features`` reads.
    A Seq2Seq is fine-tuned text-to-text, as it is, with labels."""
    if not isinstance(backbone, (Encoder, Decoder)):
        hint = (": fine-tune a Seq2Seq text-to-text without a head (prepare it as it is and pass "
                "labels, the target token ids)") if isinstance(backbone, Seq2Seq) else ""
        raise TypeError(f"task heads need a fastpt Encoder or Decoder backbone, got "
                        f"{type(backbone).__name__}{hint}")


def _layers_up_to(backbone: nn.Module, layer: int) -> int:
    """How many of the backbone's layers the features of ``layer`` need (index ``layer`` of the
    num_layers + 1 hidden states), refusing an index outside them."""
    count = backbone.config.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(count + 1) <= layer <= count:
        raise ValueError(f"layer must be 'mix' or an int in [{-(count + 1)}, {count}] (an index into the "
                         f"embeddings and this backbone's {count} layers), got {layer!r}")
    return layer % (count + 1)


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

    # The backbone's own heads (a decoder's LM head, BERT's MLM and NSP heads; the layers above
    # ``layer``, which are not run) get no gradient here: the Trainer's DDP must skip them.
    ddp_find_unused_parameters = True

    def _init_features(self, backbone: nn.Module, layer) -> None:
        check_backbone(backbone)
        if layer != "mix":
            _layers_up_to(backbone, layer)  # validates it early
        self.backbone, self.layer = backbone, layer
        self.mix = ScalarMix(backbone.config.num_layers + 1) if layer == "mix" else None

    def _features(self, input_ids, attention_mask, **kw) -> Tensor:
        if self.mix is None:
            return features(self.backbone, input_ids, attention_mask, layer=self.layer, **kw)[0]
        _, hidden = features(self.backbone, input_ids, attention_mask,
                             layer=self.backbone.config.num_layers, **kw)
        return self.mix(hidden)


def _reads_values(t: Tensor) -> bool:
    """Whether checks may read ``t``'s values: on the CPU and not while compiling, as
    ``fastpt.models.common.check_ids`` (on a GPU each check would cost a sync per call)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def pool(h: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """(B, T, d) -> (B, d) by the first token, the mean of real tokens, or the last real one
    (right padding). A row with no real token is refused: its mean would be a zero vector and
    its "last real token" a pad."""
    if how not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")
    mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if attention_mask is None \
        else attention_mask.bool()
    if _reads_values(mask):
        empty = (~mask.any(1)).nonzero()
        if len(empty):
            raise ValueError(f"attention_mask row {int(empty[0, 0])} is all padding: there is no "
                             "token to pool")
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    return h[torch.arange(h.shape[0], device=h.device), last]


def _check_loss_batch(head: str, B: int) -> None:
    """A loss over no example is NaN, which would poison a running mean without a word."""
    if B == 0:
        raise ValueError(f"{head} got an empty batch (B = 0): there is no example to average the "
                         "loss over")


def _check_class_labels(labels: Tensor, shape: tuple, what: str, num_labels: int) -> None:
    """Class ids of ``shape`` (``what`` says which), each in [0, num_labels) or IGNORE_INDEX."""
    check_labels(labels, shape, num_labels, what=what, like="", classes="num_labels", kind="class ids")


def _check_num_labels(num_labels) -> None:
    # nn.Linear would take 0 (an empty head) or fail on a negative size with a bare torch error.
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral):
        raise TypeError(f"num_labels must be an int, got {type(num_labels).__name__} {num_labels!r}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")


class SequenceClassifier(_Head):
    """``num_labels`` classes (cross-entropy) or 1 output (regression, MSE)."""

    def __init__(self, backbone: nn.Module, num_labels: int, *, pooling: str | None = None,
                 layer: int | str = -1, dropout: float = 0.1):
        super().__init__()
        _check_num_labels(num_labels)
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
            B = logits.shape[0]
            _check_loss_batch(type(self).__name__, B)
            if self.num_labels == 1:
                # (B, 1) targets are common; left as they are, they would broadcast against the
                # (B,) predictions into a (B, B) mean, a wrong loss with only a warning.
                if tuple(labels.shape) not in ((B,), (B, 1)):
                    raise ValueError(f"regression labels must be (B,) or (B, 1) with B = {B}, got "
                                     f"{tuple(labels.shape)}")
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.reshape(B).float())
            else:
                _check_class_labels(labels, (B,), "(B,)", self.num_labels)
                loss = nn.functional.cross_entropy(logits.float(), labels)
        return HeadOutput(loss, logits)


class TokenClassifier(_Head):
    def __init__(self, backbone: nn.Module, num_labels: int, *, layer: int | str = -1, dropout: float = 0.1):
        super().__init__()
        _check_num_labels(num_labels)
        self._init_features(backbone, layer)
        self.num_labels = num_labels  # what save_merged records to rebuild the head
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw) -> HeadOutput:
        h = self._features(input_ids, attention_mask, **kw)
        logits = self.classifier(self.dropout(h))
        loss = None
        if labels is not None:
            _check_loss_batch(type(self).__name__, logits.shape[0])
            # flatten() would also accept labels of another (B, T) with the same size, misaligned
            _check_class_labels(labels, logits.shape[:2], "(B, T) like the input",
                                self.classifier.out_features)
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
        return HeadOutput(qa_loss(logits, attention_mask, start_positions, end_positions), logits)


def qa_loss(logits: Tensor, attention_mask: Tensor | None, start_positions: Tensor | None,
            end_positions: Tensor | None) -> Tensor | None:
    """Mean of the start and end cross-entropies over (B, T, 2) ``logits``; None without
    positions. Each position must be a real token of its row: one outside [0, T) or on
    padding (whose logit is the dtype's minimum: a loss near 1e38) is refused, naming it."""
    if start_positions is None and end_positions is None:
        return None
    if start_positions is None or end_positions is None:
        raise ValueError("give both start_positions and end_positions, or neither")
    B, T = logits.shape[:2]
    _check_loss_batch("QuestionAnswering", B)
    real = torch.ones(B, T, dtype=torch.bool, device=logits.device) if attention_mask is None \
        else attention_mask.bool()
    for name, pos in (("start_positions", start_positions), ("end_positions", end_positions)):
        if tuple(pos.shape) != (B,):
            raise ValueError(f"{name} must be (B,) = ({B},) token positions, got shape {tuple(pos.shape)}")
        if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token positions, got {pos.dtype}")
        if _reads_values(pos):
            # positions outside [0, T) read an extra all-padding column
            inside = torch.where((pos >= 0) & (pos < T), pos, T).long().unsqueeze(1)
            on_real = torch.cat([real, real.new_zeros(B, 1)], 1).gather(1, inside).squeeze(1)
            bad = (~on_real).nonzero()
            if len(bad):
                b = int(bad[0, 0])
                raise ValueError(f"{name}[{b}] = {int(pos[b])} is not a real token of row {b} "
                                 f"(positions 0..{T - 1}; padding cannot be an answer)")
    return (nn.functional.cross_entropy(logits[..., 0].float(), start_positions.long())
            + nn.functional.cross_entropy(logits[..., 1].float(), end_positions.long())) / 2


def prompt_masked_labels(prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int,
                         eos_id: int | None = None) -> dict:
    """Decoder text-to-text batch: ``prompt + answer (+ EOS)``, labels -100 on the prompt and
    on padding only. The real EOS keeps its label even when pad == EOS (padding is found by
    position, not by id)."""
    for name, rows in (("prompt_ids", prompt_ids), ("answer_ids", answer_ids)):
        # [1, 2] (one prompt, not a list of them) failed as "'int' object is not iterable"
        if not isinstance(rows, (list, tuple)) or not all(
                isinstance(r, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
                for r in rows):
            raise TypeError(f"{name} must be a list of token-id lists (one per example), got {rows!r:.80}")
    # zip would drop the prompts (or answers) that have no partner, and max() fail on none
    if not prompt_ids or len(prompt_ids) != len(answer_ids):
        raise ValueError(f"prompt_ids and answer_ids must be non-empty lists of the same length (one "
                         f"answer per prompt), got {len(prompt_ids)} prompts and {len(answer_ids)} answers")
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
