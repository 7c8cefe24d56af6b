"""config.json in Hugging Face's field names <-> fastpt configs, for BERT, GPT-2, Llama and T5."""

from __future__ import annotations

from fastpt.models.config import DecoderConfig, EncoderConfig, Seq2SeqConfig


def to_hf_config(config) -> dict:
    """config.json contents (HF field names) for a fastpt config."""
    c = config
    if isinstance(c, EncoderConfig):
        return dict(model_type="bert", architectures=["BertForPreTraining"], vocab_size=c.vocab_size,
                    hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                    num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
                    hidden_act=c.hidden_act, hidden_dropout_prob=c.dropout,
                    attention_probs_dropout_prob=c.attention_dropout,
                    max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
                    initializer_range=c.initializer_range, layer_norm_eps=c.layer_norm_eps,
                    pad_token_id=c.pad_token_id)
    if isinstance(c, DecoderConfig) and c.flavour == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_positions=c.max_position_embeddings, n_embd=c.hidden_size, n_layer=c.num_layers,
                    n_head=c.num_heads, n_inner=c.intermediate_size, activation_function=c.hidden_act,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.attention_dropout,
                    layer_norm_epsilon=c.norm_eps, initializer_range=c.initializer_range,
                    bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                    tie_word_embeddings=c.tie_word_embeddings)
    if isinstance(c, DecoderConfig):
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
                    hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                    num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                    max_position_embeddings=c.max_position_embeddings,
                    initializer_range=c.initializer_range, rms_norm_eps=c.norm_eps,
                    rope_theta=c.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                    attention_bias=c.attention_bias, mlp_bias=c.mlp_bias,
                    attention_dropout=c.attention_dropout, tie_word_embeddings=c.tie_word_embeddings,
                    bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=c.vocab_size,
                d_model=c.hidden_size, d_kv=c.head_dim, d_ff=c.intermediate_size, num_layers=c.num_layers,
                num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                relative_attention_num_buckets=c.relative_attention_num_buckets,
                relative_attention_max_distance=c.relative_attention_max_distance,
                dropout_rate=c.dropout, layer_norm_epsilon=c.layer_norm_eps,
                initializer_factor=c.initializer_factor, feed_forward_proj=c.feed_forward_proj,
                tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id,
                eos_token_id=c.eos_token_id, decoder_start_token_id=c.decoder_start_token_id,
                is_encoder_decoder=True)


def _token(d: dict, name: str):
    v = d.get(name)
    return v[0] if isinstance(v, list) and v else v


def _required(d: dict, name: str):
    # A KeyError would name neither the file nor what is wrong with it.
    if name not in d:
        raise ValueError(f"{d.get('model_type')} config has no {name!r} field")
    return d[name]


def _flag(d: dict, name: str, default: bool) -> bool:
    """A true/false field (null: the default); any other value is refused, since
    bool("false") is True."""
    value = d.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def from_hf_config(d: dict):
    """A fastpt config from config.json contents (HF field names); a field that is missing
    or of the wrong type raises ValueError naming it."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
    kind = d.get("model_type")
    if kind == "bert":
        if not _flag(d, "tie_word_embeddings", True):
            raise ValueError("BERT with an untied MLM decoder (tie_word_embeddings=false) is not supported")
        return EncoderConfig(vocab_size=_required(d, "vocab_size"), hidden_size=_required(d, "hidden_size"),
                             num_layers=_required(d, "num_hidden_layers"),
                             num_heads=_required(d, "num_attention_heads"),
                             intermediate_size=_required(d, "intermediate_size"),
                             hidden_act=d.get("hidden_act", "gelu"),
                             dropout=d.get("hidden_dropout_prob", 0.1),
                             attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                             max_position_embeddings=d.get("max_position_embeddings", 512),
                             type_vocab_size=d.get("type_vocab_size", 2),
                             initializer_range=d.get("initializer_range", 0.02),
                             layer_norm_eps=d.get("layer_norm_eps", 1e-12), pad_token_id=d.get("pad_token_id", 0))
    if kind == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if _flag(d, flag, False):
                raise ValueError(f"GPT-2 config with {flag}=True is not supported")
        if not _flag(d, "scale_attn_weights", True):
            raise ValueError("GPT-2 config with scale_attn_weights=False is not supported")
        return DecoderConfig(flavour="gpt2", vocab_size=_required(d, "vocab_size"),
                             hidden_size=_required(d, "n_embd"), num_layers=_required(d, "n_layer"),
                             num_heads=_required(d, "n_head"),
                             intermediate_size=d.get("n_inner") or None,  # None: 4 * n_embd
                             max_position_embeddings=d.get("n_positions", 1024),
                             hidden_act=d.get("activation_function", "gelu_new"),
                             norm_eps=d.get("layer_norm_epsilon", 1e-5), dropout=d.get("resid_pdrop", 0.1),
                             attention_dropout=d.get("attn_pdrop", 0.1),
                             initializer_range=d.get("initializer_range", 0.02),
                             tie_word_embeddings=_flag(d, "tie_word_embeddings", True),
                             bos_token_id=_token(d, "bos_token_id"), eos_token_id=_token(d, "eos_token_id"),
                             pad_token_id=_token(d, "pad_token_id"))
    if kind == "llama":
        field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
        rope = d.get(field) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{field} must be a JSON object, got {rope!r}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"Llama RoPE scaling {rope} is not supported (only the default RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        return DecoderConfig(flavour="llama", vocab_size=_required(d, "vocab_size"),
                             hidden_size=_required(d, "hidden_size"),
                             num_layers=_required(d, "num_hidden_layers"),
                             num_heads=_required(d, "num_attention_heads"),
                             num_kv_heads=d.get("num_key_value_heads") or None,  # None: num_heads
                             head_dim=d.get("head_dim"), intermediate_size=_required(d, "intermediate_size"),
                             hidden_act=d.get("hidden_act", "silu"),
                             max_position_embeddings=d.get("max_position_embeddings", 2048),
                             norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
                             attention_bias=_flag(d, "attention_bias", False),
                             mlp_bias=_flag(d, "mlp_bias", False),
                             attention_dropout=d.get("attention_dropout", 0.0),
                             initializer_range=d.get("initializer_range", 0.02),
                             tie_word_embeddings=_flag(d, "tie_word_embeddings", False),
                             bos_token_id=_token(d, "bos_token_id"), eos_token_id=_token(d, "eos_token_id"),
                             pad_token_id=_token(d, "pad_token_id"))
    if kind == "t5":
        # transformers >= 5 always ties T5's embeddings and keeps the old meaning of
        # tie_word_embeddings (scale the decoder output) in scale_decoder_outputs.
        name = "scale_decoder_outputs" if d.get("scale_decoder_outputs") is not None else "tie_word_embeddings"
        tied = _flag(d, name, True)
        return Seq2SeqConfig(vocab_size=_required(d, "vocab_size"), hidden_size=_required(d, "d_model"),
                             head_dim=_required(d, "d_kv"), intermediate_size=_required(d, "d_ff"),
                             num_layers=_required(d, "num_layers"),
                             num_decoder_layers=d.get("num_decoder_layers"), num_heads=_required(d, "num_heads"),
                             relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
                             relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
                             feed_forward_proj=d.get("feed_forward_proj", "relu"),
                             layer_norm_eps=d.get("layer_norm_epsilon", 1e-6), dropout=d.get("dropout_rate", 0.1),
                             tie_word_embeddings=tied, initializer_factor=d.get("initializer_factor", 1.0),
                             pad_token_id=d.get("pad_token_id", 0), eos_token_id=_token(d, "eos_token_id") or 1,
                             decoder_start_token_id=d.get("decoder_start_token_id") or 0)
    raise ValueError(f"unsupported model_type {kind!r} (fastpt reads bert, gpt2, llama and t5)")
