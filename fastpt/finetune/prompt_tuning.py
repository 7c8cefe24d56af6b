"""Prompt tuning (Lester et al. 2021): n trainable soft tokens in front of the input
embeddings, the model itself frozen.

``PromptTuned`` wraps a task head or a bare model. A bare ``Decoder`` or ``Seq2Seq`` under
it also generates (``generate``, a KV cache): a decoder's cache holds the soft tokens from
the first call on, a Seq2Seq's encoder output holds them (``encode``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from fastpt.finetune.heads import IGNORE_INDEX, QuestionAnswering, TokenClassifier, backbone_of, qa_loss
from fastpt.finetune.peft_modules import SoftPrompt
from fastpt.models import Decoder, Encoder, Seq2Seq


def token_embedding(backbone) -> nn.Embedding:
    if isinstance(backbone, Encoder):
        return backbone.embeddings.tokens
    if isinstance(backbone, Decoder):
        return backbone.embed_tokens
    if isinstance(backbone, Seq2Seq):
        return backbone.shared
    raise TypeError(f"prompt tuning needs a fastpt Encoder, Decoder or Seq2Seq, got "
                    f"{type(backbone).__name__}")


class PromptTuned(nn.Module):
    """Prepends soft tokens to the input embeddings of ``model`` (after [CLS] for encoders,
    so [CLS] pooling still reads the first position).

    Inputs and outputs stay those of the real tokens: ``token_type_ids`` and ``position_ids``
    get entries for the virtual tokens (segment 0; the positions the model would give them by
    default), token labels get -100 there, QA positions keep indexing the input, and per-token
    logits (``TokenClassifier``, ``QuestionAnswering``, a bare Decoder's LM logits) come back
    without the virtual positions. Hidden states keep them. A Seq2Seq gets the prompt in front
    of its encoder input (Lester et al.); its labels and logits are the decoder's, untouched.

    Caches (a bare Decoder): the call that starts a cache (``use_cache`` or an empty
    ``past_key_values``) puts the soft tokens in it; later calls with that cache feed only the
    new tokens, with ``attention_mask`` and ``position_ids`` counting the real tokens, as for
    the model alone. ``new_cache`` makes room for the soft tokens. A Seq2Seq's
    ``encoder_outputs`` must come from this wrapper's ``encode``, which runs the prompt."""

    # Documents and prefix-LM lengths index the input as given; the soft tokens would put them
    # off by n.
    UNSUPPORTED = ("document_ids", "prefix_lengths")

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init_ids=()):
        super().__init__()
        self.model = model
        embed = token_embedding(backbone_of(model))
        n = num_virtual_tokens
        if init_ids:
            too_big = [i for i in init_ids if i >= embed.num_embeddings]
            if too_big:
                raise ValueError(f"prompt_init_text holds token ids {too_big[:5]} outside this model's "
                                 f"vocabulary of {embed.num_embeddings}")
            ids = torch.tensor(list(init_ids)).repeat(-(-n // len(init_ids)))[:n]
        else:
            ids = torch.randint(0, embed.num_embeddings, (n,), generator=torch.Generator().manual_seed(0))
        self.prompt = SoftPrompt(embed.weight[ids])
        self.after_first = isinstance(backbone_of(model), Encoder)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.embeddings.shape[0]

    @property
    def config(self):
        """The wrapped model's config (``generate`` reads it)."""
        return self.model.config

    # -- generation ---------------------------------------------------------------------

    def _generative(self, what: str) -> None:
        if not isinstance(self.model, (Decoder, Seq2Seq)):
            raise TypeError(f"{what} needs prompt tuning on a bare Decoder or Seq2Seq; this one wraps a "
                            f"{type(self.model).__name__}, which does not generate")

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None):
        """The model's cache for ``max_length`` real tokens, plus room for the soft tokens in a
        decoder's (a Seq2Seq's cache is its decoder's, which the prompt does not enter)."""
        self._generative("new_cache")
        extra = self.num_virtual_tokens if isinstance(self.model, Decoder) else 0
        return self.model.new_cache(batch_size, max_length + extra, dtype)

    def generate(self, *args, **kwargs) -> Tensor:
        """See :func:`fastpt.models.generation.generate`; the output holds the real tokens only."""
        self._generative("generate")
        from fastpt.models.generation import generate
        return generate(self, *args, **kwargs)

    def encode(self, input_ids=None, attention_mask=None, output_hidden_states=False):
        """A Seq2Seq's encoder output (B, n + S, d) with the soft tokens in front (what
        ``encoder_outputs`` takes), and its hidden states."""
        if not isinstance(self.model, Seq2Seq):
            raise TypeError(f"encode is a Seq2Seq's; this prompt tuning wraps a {type(self.model).__name__}")
        x, mask = self._inserted(input_ids, attention_mask)
        return self.model.encode(inputs_embeds=x, attention_mask=mask, output_hidden_states=output_hidden_states)

    # -- forward --------------------------------------------------------------------------

    def _inserted(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(embeddings, mask) with the soft tokens inserted."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a (B, T) tensor of token ids, got {type(input_ids).__name__}")
        embeds = token_embedding(backbone_of(self.model))(input_ids)
        mask = attention_mask
        if mask is None:
            mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        return self.prompt.insert(embeds, mask, int(self.after_first))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
        for name in self.UNSUPPORTED:
            if kw.get(name) is not None:
                raise ValueError(f"prompt tuning does not support {name}: it would not account for "
                                 "the virtual tokens inserted on every call")
        if kw.get("encoder_outputs") is not None:
            return self._forward_encoded(attention_mask, labels, kw)
        cache = kw.get("past_key_values")
        if (cache is not None or kw.get("use_cache")) and not isinstance(self.model, (Decoder, Seq2Seq)):
            raise ValueError(f"a KV cache needs prompt tuning on a bare Decoder or Seq2Seq, not a "
                             f"{type(self.model).__name__}")
        if isinstance(self.model, Decoder) and cache is not None and cache.length > 0:
            return self._forward_cached(input_ids, attention_mask, labels, cache, kw)
        x, mask = self._inserted(input_ids, attention_mask)
        (B, T), at, n = input_ids.shape, int(self.after_first), self.num_virtual_tokens
        qa = isinstance(self.model, QuestionAnswering)
        bare = backbone_of(self.model) is self.model and not isinstance(self.model, Seq2Seq)
        per_token = qa or isinstance(self.model, TokenClassifier) or bare
        if per_token and labels is not None:  # not a sequence's (B,) or (B, 1) labels
            labels = self._extend("labels", labels, B, T, at, n)
        for name in ("token_type_ids", "position_ids"):
            if kw.get(name) is not None:
                kw[name] = self._extend(name, kw[name], B, T, at, n)
        if qa:  # the loss is taken below, on the logits of the real tokens
            positions = kw.pop("start_positions", None), kw.pop("end_positions", None)
        if labels is not None:  # not every head takes labels (QuestionAnswering)
            kw["labels"] = labels
        out = self.model(inputs_embeds=x, attention_mask=mask, **kw)
        if isinstance(self.model, Decoder) and out.past_key_values is not None:
            out.past_key_values.soft_prompt_tokens = n  # the cache starts with them: later calls check
        if not per_token or out.logits is None:
            return out
        logits = out.logits
        if at == 0:  # decoders: the last T positions (logits_to_keep may have kept fewer)
            logits = logits[:, max(logits.shape[1] - T, 0):]
        else:
            logits = torch.cat([logits[:, :at], logits[:, at + n:]], 1)
        out = replace(out, logits=logits)
        if qa:
            out = replace(out, loss=qa_loss(logits, attention_mask, *positions))
        return out

    def _forward_cached(self, input_ids, attention_mask, labels, cache, kw):
        """A decoder step on a cache that holds the soft tokens: the new tokens only; the
        real tokens' mask and positions get the soft tokens' in front."""
        n = self.num_virtual_tokens
        if cache.soft_prompt_tokens != n:
            raise ValueError("past_key_values holds tokens but not this prompt's soft tokens: start the "
                             "cache with this prompt-tuned model (an empty cache or use_cache=True)")
        if attention_mask is not None:
            B, T = input_ids.shape
            want = cache.length - n + T
            if attention_mask.dim() != 2 or attention_mask.shape != (B, want):
                raise ValueError(f"attention_mask must be (B, real tokens cached + new) = ({B}, {want}), "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], 1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + n
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)

    def _forward_encoded(self, attention_mask, labels, kw):
        """A Seq2Seq decoder call on encoder outputs from ``encode`` (soft tokens in front);
        ``attention_mask`` is the real tokens'."""
        if not isinstance(self.model, Seq2Seq):
            raise ValueError("encoder_outputs is a Seq2Seq's input")
        memory, n = kw["encoder_outputs"], self.num_virtual_tokens
        if isinstance(memory, (tuple, list)) and memory:  # HF's (last hidden state, ...)
            memory = kw["encoder_outputs"] = memory[0]
        if attention_mask is not None:
            if attention_mask.dim() != 2 or memory.dim() != 3 or memory.shape[1] != attention_mask.shape[1] + n:
                raise ValueError(f"encoder_outputs must come from this prompt-tuned model's encode: "
                                 f"{n} soft tokens + the {attention_mask.shape[-1]} of attention_mask, got "
                                 f"encoder_outputs of shape {tuple(memory.shape)}")
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], 1)
        return self.model(attention_mask=attention_mask, labels=labels, **kw)

    @staticmethod
    def _extend(name, t, B, T, at, n):
        """(B, T) per-token labels or ids (position_ids and token_type_ids may be (1, T)) ->
        (B or 1, T + n) with entries for the virtual tokens at ``at``."""
        if t.dim() != 2 or t.shape[1] != T or t.shape[0] not in ((B,) if name == "labels" else (1, B)):
            raise ValueError(f"{name} must be (B, T) = ({B}, {T}) like input_ids, got {tuple(t.shape)}")
        if name == "position_ids":  # as by default: the virtual tokens follow token at-1, the rest move up
            start = t[:, at - 1:at] + 1 if at else t.new_zeros(t.shape[0], 1)
            return torch.cat([t[:, :at], start + torch.arange(n, device=t.device), t[:, at:] + n], 1)
        # labels: not scored; token_type_ids: after [CLS], in the first segment
        fill = t.new_full((t.shape[0], n), IGNORE_INDEX if name == "labels" else 0)
        return torch.cat([t[:, :at], fill, t[:, at:]], 1)
