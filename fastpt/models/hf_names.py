"""HF parameter names: per model family, how each HF tensor is packed from fastpt's tensors and back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastpt.models.config import DecoderConfig, EncoderConfig, Seq2SeqConfig


@dataclass
class _Entry:
    hf: str
    ours: tuple[str, ...]
    pack: Callable[..., Tensor] = lambda t: t
    unpack: Callable[[Tensor], tuple[Tensor, ...]] = lambda t: (t,)


def _same(hf: str, ours: str) -> _Entry:
    return _Entry(hf, (ours,))


def _linear(hf: str, ours: str, bias: bool = True) -> list[_Entry]:
    out = [_same(f"{hf}.weight", f"{ours}.weight")]
    return out + [_same(f"{hf}.bias", f"{ours}.bias")] if bias else out


def _layer_norm(hf: str, ours: str) -> list[_Entry]:
    return _linear(hf, ours, bias=True)


def _conv1d(hf: str, ours: str) -> list[_Entry]:
    """GPT-2 Conv1D stores (in, out): the transpose of nn.Linear's weight."""
    return [_Entry(f"{hf}.weight", (f"{ours}.weight",), lambda w: w.t(), lambda w: (w.t(),)),
            _same(f"{hf}.bias", f"{ours}.bias")]


def _gpt2_qkv(hf: str, attn: str) -> list[_Entry]:
    names = [f"{attn}.{p}_proj" for p in "qkv"]
    return [_Entry(f"{hf}.weight", tuple(f"{n}.weight" for n in names),
                   lambda q, k, v: torch.cat([q.t(), k.t(), v.t()], dim=1),
                   lambda w: tuple(x.t() for x in w.chunk(3, dim=1))),
            _Entry(f"{hf}.bias", tuple(f"{n}.bias" for n in names),
                   lambda q, k, v: torch.cat([q, k, v]), lambda b: tuple(b.chunk(3)))]


# ---------------------------------------------------------------- per-family tables

def _bert_entries(c: EncoderConfig) -> list[_Entry]:
    e = [_same("bert.embeddings.word_embeddings.weight", "embeddings.tokens.weight"),
         _same("bert.embeddings.position_embeddings.weight", "embeddings.positions.weight"),
         _same("bert.embeddings.token_type_embeddings.weight", "embeddings.segments.weight"),
         *_layer_norm("bert.embeddings.LayerNorm", "embeddings.norm")]
    for i in range(c.num_layers):
        h, o = f"bert.encoder.layer.{i}", f"layers.{i}"
        for hp, op in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            e += _linear(f"{h}.attention.self.{hp}", f"{o}.attn.{op}")
        e += _linear(f"{h}.attention.output.dense", f"{o}.attn.o_proj")
        e += _layer_norm(f"{h}.attention.output.LayerNorm", f"{o}.attn_norm")
        e += _linear(f"{h}.intermediate.dense", f"{o}.fc_in")
        e += _linear(f"{h}.output.dense", f"{o}.fc_out")
        e += _layer_norm(f"{h}.output.LayerNorm", f"{o}.mlp_norm")
    e += _linear("bert.pooler.dense", "pooler")
    e += [_same("cls.predictions.bias", "mlm_head.bias"),
          *_linear("cls.predictions.transform.dense", "mlm_head.dense"),
          *_layer_norm("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
          *_linear("cls.seq_relationship", "nsp_head")]
    return e


def _gpt2_entries(c: DecoderConfig) -> list[_Entry]:
    missing = [name for name in ("attention_bias", "mlp_bias") if not getattr(c, name)]
    if missing:  # the bias entries below failed as a bare KeyError('layers.0.attn.q_proj.bias')
        raise ValueError(f"a gpt2 Decoder with {' and '.join(f'{n}=False' for n in missing)} has no Hugging "
                         "Face layout: HF's GPT-2 always has biases (c_attn, c_proj, c_fc); use "
                         "flavour='llama' for a model without them")
    e = [_same("transformer.wte.weight", "embed_tokens.weight"),
         _same("transformer.wpe.weight", "embed_positions.weight")]
    for i in range(c.num_layers):
        h, o = f"transformer.h.{i}", f"layers.{i}"
        e += _layer_norm(f"{h}.ln_1", f"{o}.attn_norm")
        e += _gpt2_qkv(f"{h}.attn.c_attn", f"{o}.attn")
        e += _conv1d(f"{h}.attn.c_proj", f"{o}.attn.o_proj")
        e += _layer_norm(f"{h}.ln_2", f"{o}.mlp_norm")
        e += _conv1d(f"{h}.mlp.c_fc", f"{o}.mlp.fc_in")
        e += _conv1d(f"{h}.mlp.c_proj", f"{o}.mlp.fc_out")
    e += _layer_norm("transformer.ln_f", "final_norm")
    if not c.tie_word_embeddings:
        e.append(_same("lm_head.weight", "lm_head.weight"))
    return e


def _llama_entries(c: DecoderConfig) -> list[_Entry]:
    e = [_same("model.embed_tokens.weight", "embed_tokens.weight")]
    for i in range(c.num_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        e.append(_same(f"{h}.input_layernorm.weight", f"{o}.attn_norm.weight"))
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            e += _linear(f"{h}.self_attn.{p}", f"{o}.attn.{p}", c.attention_bias)
        e.append(_same(f"{h}.post_attention_layernorm.weight", f"{o}.mlp_norm.weight"))
        for p in ("gate_proj", "up_proj", "down_proj"):
            e += _linear(f"{h}.mlp.{p}", f"{o}.mlp.{p}", c.mlp_bias)
    e.append(_same("model.norm.weight", "final_norm.weight"))
    if not c.tie_word_embeddings:
        e.append(_same("lm_head.weight", "lm_head.weight"))
    return e


def _t5_entries(c: Seq2SeqConfig) -> list[_Entry]:
    e = [_same("shared.weight", "shared.weight")]
    if c.feed_forward_proj == "gated-gelu":
        ff = (("wi_0", "wi_gate"), ("wi_1", "wi"), ("wo", "wo"))
    else:
        ff = (("wi", "wi"), ("wo", "wo"))
    for stack, n in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        e.append(_same(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       f"{stack}.relative_bias.embedding.weight"))
        for i in range(n):
            h, o = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            attns = [("0.SelfAttention", "attn")]
            if stack == "decoder":
                attns.append(("1.EncDecAttention", "cross_attn"))
            for ha, oa in attns:
                for hp, op in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
                    e.append(_same(f"{h}.{ha}.{hp}.weight", f"{o}.{oa}.{op}.weight"))
            e.append(_same(f"{h}.0.layer_norm.weight", f"{o}.attn_norm.weight"))
            f = 1
            if stack == "decoder":
                e.append(_same(f"{h}.1.layer_norm.weight", f"{o}.cross_norm.weight"))
                f = 2
            for hp, op in ff:
                e.append(_same(f"{h}.{f}.DenseReluDense.{hp}.weight", f"{o}.mlp.{op}.weight"))
            e.append(_same(f"{h}.{f}.layer_norm.weight", f"{o}.mlp_norm.weight"))
        e.append(_same(f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight"))
    if not c.tie_word_embeddings:
        e.append(_same("lm_head.weight", "lm_head.weight"))
    return e


def _entries(config) -> list[_Entry]:
    if isinstance(config, EncoderConfig):
        return _bert_entries(config)
    if isinstance(config, DecoderConfig):
        return _gpt2_entries(config) if config.flavour == "gpt2" else _llama_entries(config)
    return _t5_entries(config)


def _aliases(config) -> dict[str, str]:
    """HF names that hold a copy of another tensor (tied weights): alias -> canonical name."""
    if isinstance(config, EncoderConfig):
        return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    if isinstance(config, DecoderConfig):
        emb = "transformer.wte.weight" if config.flavour == "gpt2" else "model.embed_tokens.weight"
        return {"lm_head.weight": emb} if config.tie_word_embeddings else {}
    out = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if config.tie_word_embeddings:
        out["lm_head.weight"] = "shared.weight"
    return out


# Buffers that some HF versions save and that fastpt recomputes.
_IGNORED = [re.compile(p) for p in (r"\.attn\.(masked_)?bias$", r"\.crossattention\.(masked_)?bias$",
                                    r"rotary_emb\.inv_freq$",
                                    r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")]
