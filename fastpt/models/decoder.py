"""Causal decoders: GPT-2 flavour and Llama flavour, one class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpt.models.cache import KVCache
from fastpt.models.common import (Attention, PreTrainedModel, causal_lm_loss, check_ids, check_input_ids,
                                  check_inputs_embeds, check_labels, check_logits_to_keep, init_normal_,
                                  key_padding, layers_to_run, linear_activation, positions_from_mask)
from fastpt.models.config import DecoderConfig
from fastpt.models.loss import linear_cross_entropy
from fastpt.models.outputs import DecoderOutput
from fastpt.nn import Linear, RMSNorm, RotaryEmbedding, SwiGLU
from fastpt.ops import reference
from fastpt.ops.gemm import linear
from fastpt.ops.swiglu import swiglu


class GPT2MLP(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.fc_in = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.fc_out = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.activation = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(linear_activation(self.fc_in, x, self.activation))


class DecoderLayer(nn.Module):
    """Pre-norm block: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        if c.flavour == "gpt2":
            self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
            self.mlp_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
            self.mlp = GPT2MLP(c)
        else:
            self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps)
            self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps)
            self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                              bias=c.attention_bias, dropout=c.attention_dropout)
        self.dropout = nn.Dropout(c.dropout)
        # (weight, bias) of the SwiGLU's gate and up stacked, set by generate for its call.
        self.fused_gate_up: tuple[Tensor, Tensor | None] | None = None

    def _mlp(self, x: Tensor) -> Tensor:
        if self.fused_gate_up is None:
            return self.mlp(x)
        project = linear if self.mlp.use_fused else F.linear
        gate, up = project(x, *self.fused_gate_up).chunk(2, -1)  # one matrix-vector product
        act = swiglu if self.mlp.use_fused else reference.swiglu
        return self.mlp.down_proj(act(gate, up))

    def forward(self, x: Tensor, **attn_kwargs) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), **attn_kwargs))
        return x + self.dropout(self._mlp(self.mlp_norm(x)))


def _document_positions(document_ids: Tensor) -> Tensor:
    """Position of each token inside its document (packed rows: ids change at boundaries)."""
    T = document_ids.shape[1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(new_doc, idx, 0).cummax(-1).values
    return idx - start


def _check_packing(B: int, T: int, document_ids: Tensor | None, prefix_lengths: Tensor | None) -> None:
    """document_ids: (B, T) integer; prefix_lengths: (B,) integer, each in [0, T] (read on the
    CPU only, as ``check_ids``). Unchecked, a (1, T) or (B,) tensor broadcast into the mask,
    other shapes failed with errors naming position_ids or attn_bias, and a length outside
    [0, T] or a fractional one ran as a different prefix."""
    def integer(t: Tensor) -> bool:
        return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    if document_ids is not None:
        if tuple(document_ids.shape) != (B, T):
            raise ValueError(f"document_ids must be (B, T) = {(B, T)} like the inputs, "
                             f"got {tuple(document_ids.shape)}")
        if not integer(document_ids):
            raise TypeError(f"document_ids must hold integer ids, got {document_ids.dtype}")
    if prefix_lengths is not None:
        if tuple(prefix_lengths.shape) != (B,):
            raise ValueError(f"prefix_lengths must be (B,) = ({B},), one length per row, "
                             f"got {tuple(prefix_lengths.shape)}")
        if not integer(prefix_lengths):
            raise TypeError(f"prefix_lengths must hold integer lengths, got {prefix_lengths.dtype}")
        if prefix_lengths.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(prefix_lengths))
            if lo < 0 or hi > T:
                raise ValueError(f"prefix_lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")


def _bias_from_allowed(allowed: Tensor) -> Tensor:
    """(B, T, T) bool -> (B, 1, T, T) additive bias (0 or -inf)."""
    zero = torch.zeros((), device=allowed.device)
    return torch.where(allowed, zero, float("-inf")).unsqueeze(1)


class Decoder(PreTrainedModel):
    """GPT-2 or Llama (``config.flavour``).

    ``model(input_ids, attention_mask=None, labels=None, ...)``. Extra inputs for
    pre-training and fine-tuning:

    - ``position_ids`` (B, T); default: from ``attention_mask`` (left padding) or the cache;
    - ``document_ids`` (B, T): packed sequences; a token attends only inside its document
      and positions restart at each document (unless ``position_ids`` is given);
    - ``prefix_lengths`` (B,): prefix LM; the first ``prefix_lengths[b]`` tokens are seen by
      every token of row b (bidirectional prefix), the rest causally;
    - ``inputs_embeds`` (B, T, d) instead of ``input_ids`` (prompt tuning);
    - ``past_key_values``: a :class:`KVCache` (``new_cache``); ``logits_to_keep``: only the
      last n positions get logits (generation);
    - ``return_logits=False`` with ``labels``: the loss is computed chunk by chunk without
      materialising the (B, T, V) logits (``.logits`` is None): less memory, faster steps.

    Module names: ``embed_tokens``, ``embed_positions`` (gpt2), ``layers[i].attn.{q,k,v,o}_proj``,
    ``layers[i].mlp`` (gpt2: fc_in/fc_out; llama: gate_proj/up_proj/down_proj),
    ``layers[i].attn_norm/mlp_norm``, ``final_norm``, ``lm_head``.
    """

    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig, *, use_fused: bool = True):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.flavour == "gpt2":
            self.embed_positions = nn.Embedding(c.max_position_embeddings, c.hidden_size)
            self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
            self.rotary = None
        else:
            self.embed_positions = None
            self.final_norm = RMSNorm(c.hidden_size, eps=c.norm_eps)
            self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, base=c.rope_theta)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        init_normal_(self, c.initializer_range)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.use_fused = use_fused

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        c, w = self.config, self.embed_tokens.weight
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim,
                       dtype=dtype or w.dtype, device=w.device)

    def _check_cache(self, cache, B: int) -> None:
        """A KVCache made for this model and batch (its buffers would otherwise fail to take
        this step's keys with a broadcast error naming neither)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be a KVCache (model.new_cache), got {type(cache).__name__}")
        c = self.config
        want = (c.num_layers, B, c.num_kv_heads, c.head_dim)
        got = (cache.k.shape[0], cache.k.shape[1], cache.k.shape[2], cache.k.shape[4])
        if got != want:
            raise ValueError(f"past_key_values was made for (layers, batch, kv heads, head dim) = {got}, but "
                             f"this model and batch need {want}: make it with model.new_cache(batch, length)")

    def _structure(self, B, T, past, attention_mask, position_ids, document_ids, prefix_lengths, device):
        """(position_ids, attention kwargs) for this call."""
        attn = dict(causal=True, key_padding_mask=key_padding(attention_mask), attn_bias=None)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask must be (B, past + T) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if (document_ids is not None or prefix_lengths is not None) and past:
            raise ValueError("document_ids and prefix_lengths are for training (no KV cache)")
        if document_ids is not None and prefix_lengths is not None:
            raise ValueError("give document_ids or prefix_lengths, not both")
        _check_packing(B, T, document_ids, prefix_lengths)
        if document_ids is not None:
            same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
            attn["attn_bias"] = _bias_from_allowed(same)
            if position_ids is None:
                position_ids = _document_positions(document_ids)
        if prefix_lengths is not None:
            i = torch.arange(T, device=device)
            allowed = (i.view(1, 1, T) <= i.view(1, T, 1)) | (i.view(1, 1, T) < prefix_lengths.view(-1, 1, 1))
            attn["causal"], attn["attn_bias"] = False, _bias_from_allowed(allowed)
        if position_ids is None:
            if attn["key_padding_mask"] is not None:
                position_ids = positions_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        elif position_ids.dim() != 2 or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must be (B, T) = ({B}, {T}) or (1, {T}), got {tuple(position_ids.shape)}")
        return position_ids, attn

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, past_key_values: KVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, document_ids=None, prefix_lengths=None,
                logits_to_keep: int = 0, return_logits: bool = True, num_layers: int | None = None
                ) -> DecoderOutput:
        """``num_layers`` < the model's: run only the first that many layers and return their
        hidden states, un-normed and without logits (features for a probe on a lower layer)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_input_ids("input_ids", input_ids, self.embed_tokens.num_embeddings)
        else:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if labels is not None:
            check_labels(labels, (B, T), self.config.vocab_size)
        check_logits_to_keep(logits_to_keep)
        if past_key_values is not None:
            self._check_cache(past_key_values, B)
        layers = layers_to_run(self.layers, num_layers)
        truncated = len(layers) < len(self.layers)
        if truncated and (labels is not None or use_cache or past_key_values is not None):
            raise ValueError(f"num_layers={num_layers} runs part of the model: it gives hidden states "
                             "only, with no labels, use_cache or past_key_values")
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(B, T)
        past = cache.length if cache is not None else 0
        position_ids, attn = self._structure(B, T, past, attention_mask, position_ids,
                                             document_ids, prefix_lengths, x.device)
        if self.embed_positions is not None:  # learned positions (GPT-2): a fixed table
            check_ids("position_ids", position_ids, self.embed_positions.num_embeddings, "max_position_embeddings")
            x = x + self.embed_positions(position_ids)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(layers):
            x = layer(x, rotary=self.rotary, position_ids=position_ids, cache=cache, layer_idx=i, **attn)
            if hidden is not None:
                hidden.append(x)
        if truncated:
            return DecoderOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden else None)
        x = self.final_norm(x)
        if hidden is not None:
            hidden[-1] = x
        if cache is not None:
            cache.advance(T)
        out = DecoderOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden else None,
                            past_key_values=cache)
        if labels is not None and not return_logits:  # training: loss without the (B, T, V) logits
            out.loss = linear_cross_entropy(x[:, :-1], self.lm_head.weight, labels[:, 1:],
                                            fused=self.use_fused)
            return out
        out.logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            out.loss = causal_lm_loss(out.logits, labels)
        return out
