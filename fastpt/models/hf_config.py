"""config.json in Hugging Face's field names <-> fastpt configs, for BERT, GPT-2, Llama and T5."""

from __future__ import annotations

import warnings

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
                    bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                    # HF's Llama has no residual dropout; transformers keeps the unknown key and
                    # ignores it, and fastpt reads it back (it was lost: a reloaded model trained
                    # without the dropout it was configured with)
                    fastpt_residual_dropout=c.dropout)
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _special_ids(d: dict, names: tuple[str, ...]) -> dict:
    """The token-id fields ``names`` of a config (``eos_token_id`` may be a list of ids), less
    the ids outside [0, vocab_size), dropped with a warning naming them.

    transformers loads such configs (GPT2Config(vocab_size=97) keeps bos/eos 50256, old LLaMA
    conversions have pad_token_id -1), and so does fastpt; but an id outside the vocabulary
    can never be generated nor fed to the model, so it is not kept to be used by mistake.
    Values of the wrong type are left for the config class to refuse."""
    vocab_size = d.get("vocab_size")
    if not _is_int(vocab_size):
        return {name: d.get(name) for name in names}  # the config class names the bad vocab_size

    def inside(token) -> bool:
        return not _is_int(token) or 0 <= token < vocab_size
    out, dropped = {}, []
    for name in names:
        value = d.get(name)
        if isinstance(value, list):
            kept = [t for t in value if inside(t)]
            dropped += [f"{name} {t}" for t in value if not inside(t)]
            value = kept or None  # no valid stop id left: no stop id
        elif value is not None and not inside(value):
            dropped.append(f"{name} {value}")
            value = None
        out[name] = value
    if dropped:
        warnings.warn(f"{d.get('model_type')} config: token ids outside the vocabulary [0, {vocab_size}) "
                      f"ignored (set to None): {', '.join(dropped)}", stacklevel=3)
    return out


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


def _default_if_none(value, default):
    # not `value or default`: 0 is a valid token id
    return default if value is None else value


_DEFAULT_ROPE_KEYS = {"rope_type", "type", "rope_theta"}


def _rope_theta(d: dict) -> float:
    """rope_theta of a Llama config, read as transformers 5 reads it: the legacy ``rope_scaling``,
    when set, replaces ``rope_parameters``; then the top-level ``rope_theta``.

    fastpt computes the default RoPE only. Any other type, in either field (whichever one
    transformers would use), or extra parameters (factor...) raise ValueError rather than
    load as a model that differs from transformers' at long (or any) lengths."""
    for field in ("rope_scaling", "rope_parameters"):
        rope = d.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{field} must be a JSON object, got {rope!r}")
        kinds = [t for t in (rope.get("rope_type"), rope.get("type")) if t not in (None, "default")]
        extra = sorted(k for k, v in rope.items() if k not in _DEFAULT_ROPE_KEYS and v is not None)
        if kinds or extra:
            raise ValueError(f"Llama RoPE scaling is not supported: {field} = {rope} (fastpt reads the default "
                             f"RoPE only: rope_type 'default' with rope_theta and no other parameter)")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    return rope.get("rope_theta", d.get("rope_theta", 10000.0))


_MAX_INT = 2**63
"""JSON integers have no bound; torch's sizes stop at 2**63, and no float field of a config
needs an integer beyond."""


def _check_magnitudes(d: dict) -> None:
    """Raise ValueError naming the field for an integer beyond +-2**63, in the config or one of
    its objects (rope_parameters): as a size it fails in torch with "Overflow when unpacking
    long long", as a float (rope_theta, eps) with "int too large to convert to float", neither
    naming the field. (Not recursive: fastpt reads nothing deeper, and a deep object would
    exhaust the stack.)"""
    fields = list(d.items())
    fields += [(f"{name}.{k}", v) for name, value in d.items() if isinstance(value, dict) for k, v in value.items()]
    for name, value in fields:
        if _is_int(value) and not -_MAX_INT <= value < _MAX_INT:
            text = str(value)
            raise ValueError(f"{name} is out of range: {text[:40]}{'...' if len(text) > 40 else ''} "
                             f"(expected |value| < 2**63)")


def from_hf_config(d: dict):
    """A fastpt config from config.json contents (HF field names); a field that is missing
    or of the wrong type raises ValueError naming it."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
    _check_magnitudes(d)
    kind = d.get("model_type")
    if kind == "bert":
        if not _flag(d, "tie_word_embeddings", True):
            raise ValueError("BERT with an untied MLM decoder (tie_word_embeddings=false) is not supported")
        # transformers' BERT then masks attention causally / adds cross-attention layers;
        # fastpt's Encoder is bidirectional self-attention only, so it would compute another model.
        for flag in ("is_decoder", "add_cross_attention"):
            if _flag(d, flag, False):
                raise ValueError(f"BERT config with {flag}=true is not supported (fastpt's Encoder is "
                                 f"bidirectional, without cross-attention; expected {flag}=false)")
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
                             intermediate_size=d.get("n_inner"),  # None: 4 * n_embd
                             max_position_embeddings=d.get("n_positions", 1024),
                             hidden_act=d.get("activation_function", "gelu_new"),
                             norm_eps=d.get("layer_norm_epsilon", 1e-5), dropout=d.get("resid_pdrop", 0.1),
                             attention_dropout=d.get("attn_pdrop", 0.1),
                             initializer_range=d.get("initializer_range", 0.02),
                             tie_word_embeddings=_flag(d, "tie_word_embeddings", True),
                             **_special_ids(d, ("bos_token_id", "eos_token_id", "pad_token_id")))
    if kind == "llama":
        return DecoderConfig(flavour="llama", vocab_size=_required(d, "vocab_size"),
                             hidden_size=_required(d, "hidden_size"),
                             num_layers=_required(d, "num_hidden_layers"),
                             num_heads=_required(d, "num_attention_heads"),
                             num_kv_heads=d.get("num_key_value_heads"),  # None: num_heads
                             head_dim=d.get("head_dim"), intermediate_size=_required(d, "intermediate_size"),
                             hidden_act=d.get("hidden_act", "silu"),
                             max_position_embeddings=d.get("max_position_embeddings", 2048),
                             norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(d),
                             attention_bias=_flag(d, "attention_bias", False),
                             mlp_bias=_flag(d, "mlp_bias", False),
                             attention_dropout=d.get("attention_dropout", 0.0),
                             dropout=d.get("fastpt_residual_dropout", 0.0),
                             initializer_range=d.get("initializer_range", 0.02),
                             tie_word_embeddings=_flag(d, "tie_word_embeddings", False),
                             **_special_ids(d, ("bos_token_id", "eos_token_id", "pad_token_id")))
    if kind == "t5":
        # transformers >= 5 always ties T5's embeddings and keeps the old meaning of
        # tie_word_embeddings (scale the decoder output) in scale_decoder_outputs. fastpt's
        # unscaled T5 has its own lm_head: hf._load_tensors fills it from shared.weight where
        # the file has none (transformers 5 ties it then).
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
                             # pad and start ids are fed to the decoder (shift right): an
                             # invalid one is refused, not dropped. T5 starts decoding from
                             # its pad id 0 where the config names no start id.
                             pad_token_id=d.get("pad_token_id", 0),
                             **_special_ids({"eos_token_id": 1, **d}, ("eos_token_id",)),
                             decoder_start_token_id=_default_if_none(d.get("decoder_start_token_id"), 0))
    raise ValueError(f"unsupported model_type {kind!r} (fastpt reads bert, gpt2, llama and t5)")
