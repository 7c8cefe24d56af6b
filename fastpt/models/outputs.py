"""What the models return: dataclasses with ``.loss`` (when labels are given), ``.logits``,
and optionally every layer's hidden states and the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class EncoderOutput:
    """BERT. ``logits``: MLM scores (B, T, V); ``nsp_logits``: (B, 2) IsNext/NotNext;
    ``loss`` = MLM loss + NSP loss (each where its labels are given)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    nsp_logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings + one per layer
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None


@dataclass
class DecoderOutput:
    """Causal LM. ``loss``: next-token cross-entropy (labels shifted inside, -100 ignored)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings + one per layer (last: normed)
    past_key_values: object | None = None            # the KVCache, advanced past these tokens


@dataclass
class Seq2SeqOutput:
    """T5. ``loss``: cross-entropy of ``logits`` against ``labels`` (no shift: the decoder
    input is ``labels`` shifted right, built inside when not given)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None          # decoder output (before scaling / head)
    encoder_last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None  # decoder: embeddings + one per layer
    encoder_hidden_states: tuple[Tensor, ...] | None = None
    past_key_values: object | None = None            # the Seq2SeqCache
