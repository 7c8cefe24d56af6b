"""Model configurations: dataclasses validated on construction, JSON round-trip, presets.

Field names are fastpt's own and shared across families where the meaning is shared
(``hidden_size``, ``num_layers``, ``num_heads``...). Hugging Face's ``config.json`` field
names are translated in :mod:`fastpt.models.hf_config` (``to_hf_config`` / ``from_hf_config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

_ACTS = ("gelu", "gelu_new", "relu", "silu")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


def _probability(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
               f"{type(cfg).__name__}.{name} must be in [0, 1), got {value!r}")


def _positive_float(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
               f"{type(cfg).__name__}.{name} must be a positive finite number, got {value!r}")


def _boolean(cfg, *names: str) -> None:
    # bool("false") is True: a string from a hand-edited JSON file must not flip a flag.
    for name in names:
        value = getattr(cfg, name)
        _check(isinstance(value, bool), f"{type(cfg).__name__}.{name} must be true or false, got {value!r}")


def _token_id(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        # bool is an int subclass: True would silently mean token 1.
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and 0 <= value < cfg.vocab_size),
               f"{type(cfg).__name__}.{name} must be None or a token id in [0, vocab_size), "
               f"got {value!r}")


def _stop_token_ids(cfg, name: str) -> None:
    """An end-of-sequence field: None, a token id, or a non-empty list of them (tuples become
    lists, as JSON gives them back). Generation stops at any of them, as transformers does."""
    value = getattr(cfg, name)
    if isinstance(value, tuple):
        value = list(value)
        setattr(cfg, name, value)
    if not isinstance(value, list):
        _token_id(cfg, name)
        return
    _check(len(value) > 0, f"{type(cfg).__name__}.{name} must be None, a token id or a non-empty list of "
                           f"token ids, got []")
    for token in value:
        _check(isinstance(token, int) and not isinstance(token, bool) and 0 <= token < cfg.vocab_size,
               f"{type(cfg).__name__}.{name} must hold token ids in [0, vocab_size), got {value!r}")


class _Config:
    """JSON round-trip and the preset registry, shared by the config classes."""

    model_type: ClassVar[str]
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        kind = d.pop("model_type", cls.model_type)
        if kind != cls.model_type:
            raise ValueError(f"{cls.__name__} cannot be built from a {kind!r} config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def _note_derived(self) -> None:
        """Remember the fields given as None, which ``__post_init__`` then fills with defaults
        derived from other fields (head_dim from hidden_size...): ``replace`` must derive
        them again rather than copy values that no longer fit the changed fields."""
        self._derived = frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None)

    def replace(self, **changes):
        """A copy with some fields changed (validated again). Fields that were left to their
        derived default are derived again from the new values unless given in ``changes``."""
        rederive = {name: None for name in getattr(self, "_derived", ()) if name not in changes}
        return dataclasses.replace(self, **{**rederive, **changes})

    @classmethod
    def from_name(cls, name: str, **overrides):
        """A preset of this family ("<family>-tiny", "-small", "-base"), fields overridable."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


@dataclass
class EncoderConfig(_Config):
    """BERT: token + learned position + segment embeddings, post-LN blocks, GELU MLP,
    tanh pooler on [CLS], MLM head (tied decoder with its own bias) and NSP head."""

    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = 0

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size")
        _check(self.hidden_size % self.num_heads == 0,
               f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        _check(self.hidden_act in _ACTS, f"hidden_act must be one of {_ACTS}, got {self.hidden_act!r}")
        _positive_float(self, "layer_norm_eps", "initializer_range")
        _probability(self, "dropout", "attention_dropout")
        _token_id(self, "pad_token_id")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class DecoderConfig(_Config):
    """A causal decoder, flavour "gpt2" (learned positions, pre-LN LayerNorm, tanh-GELU MLP,
    tied embeddings, biases) or "llama" (RoPE, RMSNorm, SwiGLU, GQA, untied head)."""

    model_type: ClassVar[str] = "decoder"
    flavour: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None   # None: = num_heads (no GQA)
    head_dim: int | None = None       # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4 d (gpt2), 8/3 d rounded up to 256 (llama)
    max_position_embeddings: int = 2048
    hidden_act: str | None = None     # None: gelu_new (gpt2), silu (llama)
    norm_eps: float | None = None     # None: 1e-5 (gpt2), 1e-6 (llama)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool | None = None  # None: True (gpt2), False (llama)
    attention_bias: bool | None = None       # None: True (gpt2), False (llama)
    mlp_bias: bool | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list: generation stops at any of them
    pad_token_id: int | None = None

    def __post_init__(self):
        self._note_derived()
        _check(self.flavour in ("gpt2", "llama"), f"flavour must be 'gpt2' or 'llama', got {self.flavour!r}")
        gpt2 = self.flavour == "gpt2"
        _positive(self, "hidden_size")  # before the defaults below compute with it
        # Llama's MLP width: 8/3 d rounded up to a multiple of 256 (4096 -> 11008).
        ffn = 4 * self.hidden_size if gpt2 else 256 * -(-8 * self.hidden_size // (3 * 256))
        defaults = dict(num_kv_heads=self.num_heads, intermediate_size=ffn,
                        hidden_act="gelu_new" if gpt2 else "silu", norm_eps=1e-5 if gpt2 else 1e-6,
                        tie_word_embeddings=gpt2, attention_bias=gpt2, mlp_bias=gpt2)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "max_position_embeddings")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0,
                   f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
            self.head_dim = self.hidden_size // self.num_heads
        _positive(self, "head_dim")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if gpt2:
            _check(self.num_kv_heads == self.num_heads,
                   f"gpt2 has no grouped-query attention: num_kv_heads ({self.num_kv_heads}) "
                   f"must equal num_heads ({self.num_heads})")
            _check(self.head_dim * self.num_heads == self.hidden_size,
                   "gpt2 needs head_dim * num_heads == hidden_size")
            _check(self.hidden_act in ("gelu_new", "gelu", "relu"),
                   f"gpt2 hidden_act must be gelu_new, gelu or relu, got {self.hidden_act!r}")
        else:
            _check(self.hidden_act == "silu", f"llama uses SwiGLU (hidden_act 'silu'), got {self.hidden_act!r}")
            _check(self.head_dim % 2 == 0, f"llama head_dim must be even for RoPE, got {self.head_dim}")
        _positive_float(self, "norm_eps", "rope_theta", "initializer_range")
        _probability(self, "dropout", "attention_dropout")
        _boolean(self, "tie_word_embeddings", "attention_bias", "mlp_bias")
        _token_id(self, "bos_token_id", "pad_token_id")
        _stop_token_ids(self, "eos_token_id")


@dataclass
class Seq2SeqConfig(_Config):
    """T5: RMSNorm without bias, relative position bias (computed by the first layer of each
    stack and shared by all), no 1/sqrt(d) scaling, cross-attention, ReLU or gated-GELU FFN,
    tied embeddings with the decoder output scaled by d_model**-0.5 before the head."""

    model_type: ClassVar[str] = "t5"
    vocab_size: int = 32128
    hidden_size: int = 512
    head_dim: int = 64
    intermediate_size: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"   # "relu" | "gated-gelu"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.1
    tie_word_embeddings: bool = True
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1  # a list: generation stops at any of them
    decoder_start_token_id: int = 0

    def __post_init__(self):
        self._note_derived()
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        _positive(self, "vocab_size", "hidden_size", "head_dim", "intermediate_size", "num_layers",
                  "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
                  "relative_attention_max_distance")
        # seq2seq.relative_position_bucket divides by max_exact (num_buckets // 4 in the
        # bidirectional encoder, num_buckets // 2 in the decoder) and by log(max_distance /
        # max_exact): max_exact must be >= 1 and max_distance > max_exact, or the buckets are
        # NaN, out of range or decrease with distance. Within these bounds they are in range
        # and monotone at any length (tests/test_models_validation.py checks both edges).
        _check(self.relative_attention_num_buckets >= 4,
               f"Seq2SeqConfig.relative_attention_num_buckets must be >= 4, "
               f"got {self.relative_attention_num_buckets}")
        _check(self.relative_attention_max_distance > self.relative_attention_num_buckets // 2,
               f"Seq2SeqConfig.relative_attention_max_distance must be > relative_attention_num_buckets // 2 "
               f"= {self.relative_attention_num_buckets // 2}, got {self.relative_attention_max_distance}")
        _check(self.feed_forward_proj in ("relu", "gated-gelu"),
               f"feed_forward_proj must be 'relu' or 'gated-gelu', got {self.feed_forward_proj!r}")
        _positive_float(self, "layer_norm_eps", "initializer_factor")
        _probability(self, "dropout")
        _boolean(self, "tie_word_embeddings")
        _token_id(self, "pad_token_id", "decoder_start_token_id")
        _stop_token_ids(self, "eos_token_id")


EncoderConfig.PRESETS = {
    "bert-tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                      max_position_embeddings=128),
    "bert-small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "bert-base": dict(),
}
DecoderConfig.PRESETS = {
    "gpt2-tiny": dict(flavour="gpt2", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=128),
    "gpt2-small": dict(flavour="gpt2", vocab_size=50257, hidden_size=512, num_layers=6, num_heads=8,
                       max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256),
    "gpt2-base": dict(flavour="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                      max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256),
    "llama-tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                       intermediate_size=176, max_position_embeddings=256),
    # The benchmark configuration of issue F5.
    "llama-small": dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
                        intermediate_size=1408, max_position_embeddings=2048),
    "llama-base": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                       intermediate_size=5632, max_position_embeddings=4096),
}
Seq2SeqConfig.PRESETS = {
    "t5-tiny": dict(vocab_size=1000, hidden_size=64, head_dim=16, intermediate_size=128, num_layers=2,
                    num_heads=4),
    "t5-small": dict(),
    "t5-base": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
}

CONFIG_CLASSES = (EncoderConfig, DecoderConfig, Seq2SeqConfig)


def from_name(name: str, **overrides) -> _Config:
    """The preset config called ``name`` (e.g. "llama-tiny", "bert-base", "t5-small")."""
    for cls in CONFIG_CLASSES:
        if name in cls.PRESETS:
            return cls.from_name(name, **overrides)
    known = sorted(n for cls in CONFIG_CLASSES for n in cls.PRESETS)
    raise ValueError(f"unknown model preset {name!r}; known: {known}")


def config_from_dict(d: dict[str, Any]) -> _Config:
    """The config class named by ``d["model_type"]``, built from ``d`` (see ``to_dict``)."""
    for cls in CONFIG_CLASSES:
        if d.get("model_type") == cls.model_type:
            return cls.from_dict(d)
    raise ValueError(f"unknown model_type {d.get('model_type')!r}")
