"""BERT-style encoder with its pre-training heads (MLM and NSP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastpt.models.common import (IGNORE_INDEX, Attention, PreTrainedModel, check_ids, check_input_ids,
                                  check_inputs_embeds, check_labels, cross_entropy, first_label_outside, init_normal_,
                                  key_padding, layers_to_run, linear_activation)
from fastpt.models.config import EncoderConfig
from fastpt.models.outputs import EncoderOutput
from fastpt.nn.linear import Linear


class EncoderEmbeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.segments = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds) -> Tensor:
        if input_ids is not None:
            check_input_ids("input_ids", input_ids, self.tokens.num_embeddings)
        else:
            check_inputs_embeds(inputs_embeds, self.tokens.embedding_dim)
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        for name, ids in (("position_ids", position_ids), ("token_type_ids", token_type_ids)):
            if ids.dim() != 2 or ids.shape[1] != T or ids.shape[0] not in (1, B):  # else a broadcast error
                raise ValueError(f"{name} must be (B, T) = ({B}, {T}) or (1, {T}), got {tuple(ids.shape)}")
        check_ids("position_ids", position_ids, self.positions.num_embeddings, "max_position_embeddings")
        check_ids("token_type_ids", token_type_ids, self.segments.num_embeddings, "type_vocab_size")
        x = x + self.positions(position_ids) + self.segments(token_type_ids)
        return self.dropout(self.norm(x))


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_heads, c.head_dim, bias=True,
                              dropout=c.attention_dropout)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc_in = Linear(c.hidden_size, c.intermediate_size)
        self.fc_out = Linear(c.intermediate_size, c.hidden_size)
        self.mlp_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.activation = c.hidden_act
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, attn_bias: Tensor | None) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, key_padding_mask=key_padding_mask,
                                                      attn_bias=attn_bias)))
        return self.mlp_norm(x + self.dropout(self.fc_out(linear_activation(self.fc_in, x, self.activation))))


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then the decoder tied to the token embeddings, own bias."""

    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.activation = c.hidden_act

    def forward(self, x: Tensor, embedding_weight: Tensor) -> Tensor:
        h = self.norm(linear_activation(self.dense, x, self.activation))
        return nn.functional.linear(h, embedding_weight, self.bias)


def _check_nsp_labels(labels: Tensor, batch: int) -> None:
    """(B,) integers, 0 (IsNext), 1 (NotNext) or IGNORE_INDEX; torch's own errors name none."""
    if labels.shape != (batch,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"next_sentence_label must be ({batch},) integers, got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    at = first_label_outside(labels, 2)
    if at is not None:
        raise ValueError(f"next_sentence_label must be 0 (IsNext), 1 (NotNext) or {IGNORE_INDEX}, "
                         f"got {int(labels[at])}")


def _needs_nsp_head(labels: Tensor | None, next_sentence_label: Tensor | None) -> bool:
    """Whether the pooler and NSP head run: for their outputs (no labels: inference, feature
    extraction) or for the NSP loss, not in MLM-only training. There, DDP would wait forever for
    their gradients: it waits for every parameter an output depends on, even with
    find_unused_parameters=True, and the MLM loss depends on neither."""
    return labels is None or next_sentence_label is not None


class Encoder(PreTrainedModel):
    """BERT. ``model(input_ids, attention_mask, token_type_ids, labels=..., next_sentence_label=...)``.

    Module names: ``embeddings``, ``layers[i].attn.{q,k,v,o}_proj``, ``layers[i].fc_in/fc_out``,
    ``pooler``, ``mlm_head``, ``nsp_head``. ``inputs_embeds`` replaces the token embeddings
    (prompt tuning); ``attn_bias`` (additive, (B, 1 or H, T, T)) is passed to every layer.
    ``return_logits=False`` with ``labels``: the MLM head runs on the labelled positions only
    (``.logits`` is None). With ``labels`` and no ``next_sentence_label`` (MLM pre-training)
    the pooler and NSP head do not run (``.pooler_output`` and ``.nsp_logits`` are None): their
    outputs would not reach the loss, and DDP needs every output to (see ``_needs_nsp_head``)."""

    config_class = EncoderConfig
    # MLM alone leaves the pooler and NSP head without gradient (and fine-tuning heads leave the
    # MLM and NSP heads): the Trainer's DDP must then skip them.
    ddp_find_unused_parameters = True

    @staticmethod
    def loss_terms(batch: dict) -> dict:
        """BERT's loss term by term, for the Trainer: ``mlm_loss`` is a mean over the masked
        tokens, ``nsp_loss`` over the sequences, so weighting micro-batches by either count alone
        would not give the update of one large batch. A batch without ``next_sentence_label``
        has the MLM term alone. (Also :func:`fastpt.pretrain.mlm.mlm_nsp_loss_terms`.)"""
        terms = {"mlm_loss": (1.0, (batch["labels"] != IGNORE_INDEX).sum())}
        if "next_sentence_label" in batch:
            terms["nsp_loss"] = (1.0, (batch["next_sentence_label"] != IGNORE_INDEX).sum())
        return terms

    def __init__(self, config: EncoderConfig, *, use_fused: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.pooler = Linear(config.hidden_size, config.hidden_size)
        self.mlm_head = MLMHead(config)
        self.nsp_head = Linear(config.hidden_size, 2)
        init_normal_(self, config.initializer_range)
        self.use_fused = use_fused

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
               inputs_embeds=None, attn_bias=None, output_hidden_states=False, num_layers=None):
        """The backbone: (last hidden state (B, T, d), hidden states or None). ``num_layers``
        runs only the first that many layers (features for a probe on a lower layer)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        B, T = x.shape[:2]
        if T == 0:  # the pooler reads the first ([CLS]) token
            raise ValueError("the input must hold at least one token, got length 0")
        mask = key_padding(attention_mask, (B, T))
        hidden = [x] if output_hidden_states else None
        for layer in layers_to_run(self.layers, num_layers):
            x = layer(x, mask, attn_bias)
            if hidden is not None:
                hidden.append(x)
        return x, tuple(hidden) if hidden is not None else None

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, attn_bias=None,
                output_hidden_states=False, return_logits=True) -> EncoderOutput:
        x, hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                inputs_embeds, attn_bias, output_hidden_states)
        if labels is not None:
            check_labels(labels, x.shape[:2], self.config.vocab_size)
        out = EncoderOutput(last_hidden_state=x, hidden_states=hidden)
        if _needs_nsp_head(labels, next_sentence_label):
            out.pooler_output = torch.tanh(self.pooler(x[:, 0]))
            out.nsp_logits = self.nsp_head(out.pooler_output)
        if labels is not None and not return_logits:
            # MLM training: the head runs on the labelled (~15%) positions only.
            picked = labels != IGNORE_INDEX
            out.mlm_loss = cross_entropy(self.mlm_head(x[picked], self.embeddings.tokens.weight),
                                         labels[picked])
        else:
            out.logits = self.mlm_head(x, self.embeddings.tokens.weight)
            if labels is not None:
                out.mlm_loss = cross_entropy(out.logits, labels)
        if next_sentence_label is not None:
            _check_nsp_labels(next_sentence_label, out.nsp_logits.shape[0])
            out.nsp_loss = cross_entropy(out.nsp_logits, next_sentence_label)
        losses = [l for l in (out.mlm_loss, out.nsp_loss) if l is not None]
        if losses:
            out.loss = sum(losses)
        return out
