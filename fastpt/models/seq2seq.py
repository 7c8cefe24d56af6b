"""T5-style encoder-decoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastpt.models.cache import KVCache, Seq2SeqCache
from fastpt.models.common import (IGNORE_INDEX, Attention, PreTrainedModel, check_input_ids, check_labels,
                                  check_logits_to_keep, cross_entropy, key_padding, linear_activation)
from fastpt.models.config import Seq2SeqConfig
from fastpt.models.loss import linear_cross_entropy
from fastpt.models.outputs import Seq2SeqOutput
from fastpt.nn import Linear, RMSNorm


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's buckets of (key position - query position): half exact for small distances,
    half logarithmic up to ``max_distance``; bidirectional splits them by sign."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
    """Embedding(buckets, H): the additive (1, H, T, S) bias of every layer of a stack."""

    def __init__(self, c: Seq2SeqConfig, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance

    def forward(self, T: int, S: int, past: int = 0) -> Tensor:
        """Bias of queries at positions past..past+T-1 over keys at 0..S-1."""
        device = self.embedding.weight.device
        q = torch.arange(past, past + T, device=device).unsqueeze(1)
        k = torch.arange(S, device=device).unsqueeze(0)
        buckets = relative_position_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class FeedForward(nn.Module):
    """relu: wo(relu(wi x)); gated-gelu: wo(gelu_new(wi_0 x) * wi_1 x). No biases."""

    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        self.gated = c.feed_forward_proj == "gated-gelu"
        self.wi = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.wi_gate = Linear(c.hidden_size, c.intermediate_size, bias=False) if self.gated else None
        self.wo = Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.activation = "gelu_new" if self.gated else "relu"
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = linear_activation(self.wi_gate, x, self.activation) * self.wi(x)
        else:
            h = linear_activation(self.wi, x, self.activation)
        return self.wo(self.dropout(h))


def _attention(c: Seq2SeqConfig) -> Attention:
    # T5 folds 1/sqrt(d) into its initialisation: the attention itself does not scale.
    return Attention(c.hidden_size, c.num_heads, c.num_heads, c.head_dim, bias=False,
                     dropout=0.0, scale=1.0)


class Seq2SeqLayer(nn.Module):
    """Pre-norm: self-attention, [cross-attention], feed-forward, each with a residual."""

    def __init__(self, c: Seq2SeqConfig, is_decoder: bool):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = _attention(c)
        self.cross_norm = RMSNorm(c.hidden_size, eps=c.layer_norm_eps) if is_decoder else None
        self.cross_attn = _attention(c) if is_decoder else None
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = FeedForward(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, *, bias: Tensor, key_padding_mask, causal: bool, cache=None,
                layer_idx: int = 0, memory=None, memory_mask=None) -> Tensor:
        self_cache = cache.self_attention if cache is not None else None
        x = x + self.dropout(self.attn(self.attn_norm(x), cache=self_cache, layer_idx=layer_idx,
                                       causal=causal, key_padding_mask=key_padding_mask, attn_bias=bias))
        if self.cross_attn is not None:
            h = self.cross_norm(x)
            kv = cache.cross[layer_idx] if cache is not None else None
            if kv is None:
                kv = self.cross_attn.project_kv(memory)
                if cache is not None:
                    cache.cross[layer_idx] = kv
            q = self.cross_attn.project_q(h)
            x = x + self.dropout(self.cross_attn.attend_and_project(q, *kv, key_padding_mask=memory_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder or the decoder: layers, the shared relative bias, a final RMSNorm."""

    def __init__(self, c: Seq2SeqConfig, is_decoder: bool):
        super().__init__()
        n = c.num_decoder_layers if is_decoder else c.num_layers
        self.is_decoder = is_decoder
        self.relative_bias = RelativePositionBias(c, bidirectional=not is_decoder)
        self.layers = nn.ModuleList(Seq2SeqLayer(c, is_decoder) for _ in range(n))
        self.final_norm = RMSNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, *, cache: Seq2SeqCache | None = None,
                memory=None, memory_mask=None, output_hidden_states=False):
        past = cache.length if cache is not None else 0
        B, T = x.shape[:2]
        bias = self.relative_bias(T, past + T, past)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        mask = key_padding(mask, (B, past + T), "decoder_attention_mask" if self.is_decoder else "attention_mask")
        if memory is not None:  # the decoder's cross-attention: attention_mask masks the encoder's keys
            memory_mask = key_padding(memory_mask, (B, memory.shape[1]), "attention_mask")
        for i, layer in enumerate(self.layers):
            x = layer(x, bias=bias, key_padding_mask=mask, causal=self.is_decoder,
                      cache=cache, layer_idx=i, memory=memory, memory_mask=memory_mask)
            if hidden is not None:
                hidden.append(x)
        x = self.dropout(self.final_norm(x))
        if hidden is not None:
            hidden[-1] = x
        if cache is not None:
            cache.self_attention.advance(T)
        return x, tuple(hidden) if hidden is not None else None


class Seq2Seq(PreTrainedModel):
    """T5. ``model(input_ids, attention_mask, labels=...)`` builds ``decoder_input_ids`` by
    shifting ``labels`` right (decoder start token = pad); or give ``decoder_input_ids``.

    ``encoder_outputs`` (B, S, d) skips the encoder (generation runs it once).
    ``return_logits=False`` with ``labels``: chunked loss, no (B, T, V) logits.
    ``decoder_attention_mask`` (B, past + T) masks decoder keys. Module names:
    ``shared``, ``encoder/decoder.layers[i].attn.{q,k,v,o}_proj``, ``decoder.layers[i].cross_attn``,
    ``...layers[i].mlp.{wi, wi_gate, wo}``, ``encoder/decoder.relative_bias``, ``lm_head``
    (untied only).

    Training with a learned relative bias on the fused path: the bias needs a gradient,
    which the fused attention does not give, so those attention calls run eagerly."""

    config_class = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig, *, use_fused: bool = True):
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.hidden_size)
        self.encoder = Stack(c, is_decoder=False)
        self.decoder = Stack(c, is_decoder=True)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, bias=False)
        self._init_weights()
        self.use_fused = use_fused

    def _init_weights(self) -> None:
        """T5's initialisation (HF T5PreTrainedModel._init_weights)."""
        c, f = self.config, self.config.initializer_factor
        d, dkv, H = c.hidden_size, c.head_dim, c.num_heads
        nn.init.normal_(self.shared.weight, 0.0, f)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, f)
        for m in self.modules():
            if isinstance(m, Attention):
                nn.init.normal_(m.q_proj.weight, 0.0, f * (d * dkv) ** -0.5)
                nn.init.normal_(m.k_proj.weight, 0.0, f * d ** -0.5)
                nn.init.normal_(m.v_proj.weight, 0.0, f * d ** -0.5)
                nn.init.normal_(m.o_proj.weight, 0.0, f * (H * dkv) ** -0.5)
            elif isinstance(m, FeedForward):
                for w in (m.wi, m.wi_gate):
                    if w is not None:
                        nn.init.normal_(w.weight, 0.0, f * d ** -0.5)
                nn.init.normal_(m.wo.weight, 0.0, f * c.intermediate_size ** -0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.embedding.weight, 0.0, f * d ** -0.5)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> Seq2SeqCache:
        c, w = self.config, self.shared.weight
        return Seq2SeqCache(KVCache(c.num_decoder_layers, batch_size, c.num_heads, max_length,
                                    c.head_dim, dtype=dtype or w.dtype, device=w.device))

    def shift_right(self, labels: Tensor) -> Tensor:
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids("input_ids", input_ids, self.shared.num_embeddings)
        x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds
        return self.encoder(x, attention_mask, output_hidden_states=output_hidden_states)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, encoder_outputs: Tensor | None = None,
                inputs_embeds=None, decoder_inputs_embeds=None,
                past_key_values: Seq2SeqCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0,
                return_logits: bool = True) -> Seq2SeqOutput:
        enc_hidden = None
        if past_key_values is not None and not isinstance(past_key_values, Seq2SeqCache):
            raise TypeError(f"past_key_values must be a Seq2SeqCache (model.new_cache), got "
                            f"{type(past_key_values).__name__}")
        check_logits_to_keep(logits_to_keep)
        if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs:  # HF's (last hidden state, ...)
            encoder_outputs = encoder_outputs[0]
        if encoder_outputs is None:
            encoder_outputs, enc_hidden = self.encode(input_ids, attention_mask, inputs_embeds,
                                                      output_hidden_states)
        elif not isinstance(encoder_outputs, Tensor):
            raise TypeError(f"encoder_outputs must be a (B, S, hidden_size) tensor or a tuple starting "
                            f"with one, got {type(encoder_outputs).__name__}")
        elif encoder_outputs.dim() != 3 or encoder_outputs.shape[-1] != self.config.hidden_size:
            raise ValueError(f"encoder_outputs must be (B, S, hidden_size={self.config.hidden_size}), "
                             f"got {tuple(encoder_outputs.shape)}")
        shifted = decoder_input_ids is None and decoder_inputs_embeds is None
        if shifted:
            if labels is None:
                raise ValueError("give decoder_input_ids (or labels to shift right)")
            # Checked before shift_right, which would blame decoder_input_ids for bad labels.
            check_labels(labels, None, self.config.vocab_size)
            decoder_input_ids = self.shift_right(labels)
        if decoder_inputs_embeds is None:
            check_input_ids("decoder_input_ids", decoder_input_ids, self.shared.num_embeddings)
        y = self.shared(decoder_input_ids) if decoder_inputs_embeds is None else decoder_inputs_embeds
        if labels is not None and not shifted:
            check_labels(labels, y.shape[:2], self.config.vocab_size)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(y.shape[0], y.shape[1])
        y, dec_hidden = self.decoder(y, decoder_attention_mask, cache=cache, memory=encoder_outputs,
                                     memory_mask=attention_mask, output_hidden_states=output_hidden_states)
        h = y[:, -logits_to_keep:] if logits_to_keep else y
        if self.lm_head is None:  # tied: T5 rescales before reusing the embedding matrix
            h, head = h * self.config.hidden_size ** -0.5, self.shared.weight
        else:
            head = self.lm_head.weight
        out = Seq2SeqOutput(last_hidden_state=y, encoder_last_hidden_state=encoder_outputs,
                            hidden_states=dec_hidden, encoder_hidden_states=enc_hidden, past_key_values=cache)
        if labels is not None and not return_logits:  # loss without the (B, T, V) logits
            out.loss = linear_cross_entropy(h, head, labels, fused=self.use_fused)
            return out
        out.logits = nn.functional.linear(h, head)
        if labels is not None:
            out.loss = cross_entropy(out.logits, labels)
        return out
