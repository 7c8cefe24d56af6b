"""Hugging Face interop: HF parameter names, safetensors files, and conversion from/to
``transformers`` models (BERT, GPT-2, Llama, T5); config.json fields in :mod:`hf_config`,
the name tables in :mod:`hf_names`, the state dicts in :mod:`hf_state`.

The mapping between fastpt's parameter names and HF's is one list of :class:`_Entry` per
model, built from the config: an HF tensor is made from one or more fastpt tensors
(``pack``) and split back (``unpack``); GPT-2's fused, transposed ``c_attn`` is the only
non-trivial one. Loading checks the file against that list and names every missing,
unexpected and mis-shaped tensor. Only safetensors files are read (never pickle): one
model.safetensors, or the shards a model.safetensors.index.json lists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from fastpt._atomic import atomic_write
from fastpt.models.config import DecoderConfig, EncoderConfig, Seq2SeqConfig
from fastpt.models.hf_config import from_hf_config, to_hf_config  # noqa: F401  (re-exported)
from fastpt.models.hf_files import (  # noqa: F401  (CheckpointError and the readers re-exported)
    CONFIG_NAME, INDEX_NAME, WEIGHT_DTYPES, WEIGHTS_NAME, CheckpointError, as_weight_dtype, read_config,
    read_safetensors, read_safetensors_header, weight_files)
from fastpt.models.hf_names import _IGNORED, _aliases, _entries
from fastpt.models.hf_state import hf_state_dict, load_hf_state_dict  # noqa: F401  (re-exported)

CONFIG_SHA256 = "fastpt_config_sha256"
"""Key of model.safetensors' metadata holding :func:`_config_sha256` of the config saved
with it (transformers ignores it; files written by transformers lack it)."""


def model_for_config(config, use_fused: bool = True):
    from fastpt.models.decoder import Decoder
    from fastpt.models.encoder import Encoder
    from fastpt.models.seq2seq import Seq2Seq
    cls = {EncoderConfig: Encoder, DecoderConfig: Decoder, Seq2SeqConfig: Seq2Seq}[type(config)]
    return cls(config, use_fused=use_fused)


def _config_sha256(config) -> str:
    """sha256 of the fastpt config, not of config.json's bytes: reformatting config.json, or
    editing fields fastpt does not read, keeps the weights loadable."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()


# ---------------------------------------------------------------- files

def save_pretrained(model, path) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    _check_savable(model, path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in hf_state_dict(model).items()}
    config = {**to_hf_config(model.config), "fastpt_version": _version()}
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # The config as from_pretrained will read it back (config.json omits some fields, e.g.
    # Llama's dropout), so that the check there compares like with like.
    metadata = {"format": "pt", CONFIG_SHA256: _config_sha256(from_hf_config(config))}

    def write_config(tmp):
        Path(tmp).write_bytes(config_bytes)

    def write_weights(tmp):
        save_file(tensors, tmp, metadata=metadata)
        # config.json is replaced only once the new weights are complete, and they follow
        # right after: a failure before leaves the old pair. Between the two renames, the
        # old weights' CONFIG_SHA256 no longer matches and from_pretrained says so.
        atomic_write(path / CONFIG_NAME, write_config)
    config_file = path / CONFIG_NAME
    previous = config_file.read_bytes() if config_file.is_file() else None
    try:
        atomic_write(path / WEIGHTS_NAME, write_weights)
    except BaseException:
        # The weights' rename failed after the new config's: put the old config back beside
        # the old weights, so the previous save still loads (a kill between the two renames
        # is the one case left, and from_pretrained then names the mismatch).
        if previous is not None and config_file.is_file() and config_file.read_bytes() == config_bytes:
            atomic_write(config_file, lambda tmp: Path(tmp).write_bytes(previous))
        raise


def _check_savable(model, path: Path) -> None:
    """Raise ValueError, before anything is written, for weights from_pretrained would refuse:
    saved over an earlier checkpoint, they would replace a loadable one by one that is not
    (a run that diverged to NaN saves NaN). Meta tensors have no data to write."""
    ours = model.state_dict()
    names = [n for e in _entries(model.config) for n in e.ours]
    meta = [n for n in names if ours[n].is_meta]
    if meta:
        raise ValueError(f"save_pretrained({path}): {len(meta)} tensors of the model have no data (meta "
                         f"device): {', '.join(meta[:10])}{' ...' if len(meta) > 10 else ''}")
    bad = [n for n in names if ours[n].dtype in WEIGHT_DTYPES and not torch.isfinite(ours[n]).all()]
    if bad:
        raise ValueError(f"save_pretrained({path}): NaN or infinite values in {len(bad)} tensors of the model "
                         f"(from_pretrained would refuse them; nothing was written): {', '.join(bad)}")


def _version() -> str:
    import fastpt
    return fastpt.__version__


_MAX_BUFFER_BYTES = 256 * 2**20
"""Buffers (not in the file) a config may ask for beyond the size of its weights file:
Llama 3's 131072 x 128 rotary tables take 64 MiB."""


def _check_fits(config, shapes: dict[str, list[int]], config_file: Path, weights: Path, weights_bytes: int,
                use_fused: bool) -> None:
    """Raise CheckpointError unless the model of ``config`` fits the file's tensor ``shapes``,
    before any of it is allocated: a config.json asking for 10**12 embeddings or 10**6 layers
    must fail as a mismatch, not in the allocator."""
    layers = config.num_layers + getattr(config, "num_decoder_layers", 0)
    if layers > len(shapes):  # every layer has tensors: no need to build a million of them
        raise CheckpointError(f"{weights} does not fit {config_file}: the config has {layers} layers, "
                              f"the file holds {len(shapes)} tensors in all")
    try:
        with torch.device("meta"):
            meta = model_for_config(config, use_fused=use_fused)
    except (RuntimeError, TypeError, OverflowError) as e:
        # Sizes each below 2**63 whose product is not (vocab_size 2**40 x hidden_size 2**40):
        # torch says "Storage size calculation overflowed" or "Overflow when unpacking long
        # long", naming no file.
        raise CheckpointError(f"{config_file}: the model it describes has tensors too large to exist "
                              f"({str(e).splitlines()[0]})") from e
    _load_tensors(meta, {n: torch.empty(s, device="meta") for n, s in shapes.items()}, source=str(weights))
    # Buffers are not in the file (rotary tables: max_position_embeddings x head_dim): the
    # file cannot vouch for their size, but beyond its own size they are the config's mistake.
    big = {n: b for n, b in meta.named_buffers() if b.numel()}
    size = sum(b.numel() * b.element_size() for b in big.values())
    if size > max(_MAX_BUFFER_BYTES, weights_bytes):
        name, b = max(big.items(), key=lambda kv: kv[1].numel())
        raise CheckpointError(f"{config_file}: the model would need {size / 2**30:.1f} GiB of buffers not stored "
                              f"in {weights} (largest: {name} {list(b.shape)}; max_position_embeddings = "
                              f"{getattr(config, 'max_position_embeddings', None)})")


_BASE_LAYOUTS = {"bert": ("bert.", "embeddings.", "BertModel"), "gpt2": ("transformer.", "wte.", "GPT2Model"),
                 "llama": ("model.", "embed_tokens.", "LlamaModel")}
"""family: (prefix of the full model's names, first name of the base model, base class)."""


def _family(config) -> str:
    return config.flavour if isinstance(config, DecoderConfig) else config.model_type


def _base_layout(config, tensors: dict[str, Tensor]) -> tuple[str, str] | None:
    """(prefix, class) of a base-model checkpoint (BertModel, GPT2Model, LlamaModel): its names
    lack the full model's prefix and it has no heads. None for the full model's layout."""
    layout = _BASE_LAYOUTS.get(_family(config))
    if layout is None:
        return None
    prefix, first, cls = layout
    if any(k.startswith(first) for k in tensors) and not any(k.startswith(prefix) for k in tensors):
        return prefix, cls
    return None


def _from_base_layout(model, tensors: dict[str, Tensor], source: str):
    """(tensors under the full model's names, allow_missing) for a base-model checkpoint, or
    the arguments unchanged. A decoder needs its LM head: only a tied one (GPT-2's usual, or
    Llama with tie_word_embeddings) is in such a file."""
    layout = _base_layout(model.config, tensors)
    if layout is None:
        return tensors, None
    prefix, cls = layout
    tensors = {prefix + k: v for k, v in tensors.items()}
    if isinstance(model.config, EncoderConfig):  # the pre-training heads keep their initialisation
        return tensors, lambda name: name.startswith("cls.")
    if not model.config.tie_word_embeddings:
        raise CheckpointError(f"{source} holds a base model ({cls}: no '{prefix}' prefix) without an LM head, "
                              f"and its config does not tie the head to the embeddings "
                              f"(tie_word_embeddings=false): there is no lm_head.weight to load")
    return tensors, None


def _fill_untied_t5_head(config, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5 always ties T5's lm_head to shared.weight and saves no lm_head.weight
    (a T5 v1.1 says so by scale_decoder_outputs=false): fastpt's unscaled T5, whose head is its
    own tensor, starts from a copy of the embeddings then, as transformers computes."""
    if (isinstance(config, Seq2SeqConfig) and not config.tie_word_embeddings
            and "lm_head.weight" not in tensors and "shared.weight" in tensors):
        return {**tensors, "lm_head.weight": tensors["shared.weight"]}
    return tensors


def _load_tensors(model, tensors: dict[str, Tensor], source: str) -> None:
    tensors, allow = _from_base_layout(model, tensors, source)
    tensors = _fill_untied_t5_head(model.config, tensors)
    load_hf_state_dict(model, tensors, allow_missing=allow, source=source)


def from_pretrained(path, *, dtype: torch.dtype | str | None = None, use_fused: bool = True,
                    accept_edited_config: bool = False):
    """The fastpt model of a HF-layout folder: config.json + model.safetensors (or shards
    listed by model.safetensors.index.json).

    ``dtype``: a floating-point torch.dtype or its name ("bfloat16"); anything else raises
    TypeError before reading. A weights file fastpt saved records the config saved with it;
    a config.json that differs (an interrupted save, or an edit since) is refused unless
    ``accept_edited_config``."""
    dtype = as_weight_dtype(dtype)
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    weights = weight_files(path)
    config = read_config(config_file)
    shapes, metadata = weights.headers()
    _check_fits(config, shapes, config_file, weights.source, weights.size, use_fused)
    # Shapes can fit and values still not (rope_theta, norm eps): the config saved with the
    # weights tells, in files fastpt wrote.
    saved_with = metadata.get(CONFIG_SHA256)
    if saved_with is not None and saved_with != _config_sha256(config) and not accept_edited_config:
        raise CheckpointError(f"{weights.source} was saved with another config than {config_file} describes "
                              f"({CONFIG_SHA256} in its metadata differs): an interrupted save_pretrained, "
                              f"or config.json edited since (to load an edit you made on purpose, pass "
                              f"accept_edited_config=True to from_pretrained)")
    model = model_for_config(config, use_fused=use_fused)
    if dtype is not None:  # before loading: a value the dtype cannot hold is refused, not made inf
        model.to(dtype)
    _load_tensors(model, weights.tensors(), source=str(weights.source))
    return model.eval()


# ---------------------------------------------------------------- transformers models

def from_hf(hf_model, *, use_fused: bool = True):
    """A fastpt model with the weights of a ``transformers`` BertForPreTraining / BertModel,
    GPT2LMHeadModel / GPT2Model, LlamaForCausalLM (LlamaModel if its head is tied) or
    T5ForConditionalGeneration."""
    config = from_hf_config(hf_model.config.to_dict())
    model = model_for_config(config, use_fused=use_fused)
    _load_tensors(model, hf_model.state_dict(), source=type(hf_model).__name__)
    return model.train(hf_model.training)


_HF_CLASSES = {"bert": "BertForPreTraining", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
               "t5": "T5ForConditionalGeneration"}


def to_hf(model):
    """The ``transformers`` model (same weights): BertForPreTraining, GPT2LMHeadModel,
    LlamaForCausalLM or T5ForConditionalGeneration."""
    import transformers
    d = to_hf_config(model.config)
    kind = d["model_type"]
    if kind == "t5" and not model.config.tie_word_embeddings:
        raise ValueError("transformers >= 5 always ties T5's lm_head to the embeddings; an untied "
                         "fastpt Seq2Seq has no transformers equivalent (save_pretrained still works)")
    hf_config = transformers.AutoConfig.for_model(**d)
    hf_model = getattr(transformers, _HF_CLASSES[kind])(hf_config)
    tensors = hf_state_dict(model)
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    aliases = _aliases(model.config)
    bad = [n for n in missing if n not in aliases and not any(p.search(n) for p in _IGNORED)]
    if bad or unexpected:
        raise RuntimeError(f"conversion to {type(hf_model).__name__} failed: missing {bad}, unexpected {unexpected}")
    hf_model.tie_weights()
    return hf_model.train(model.training)
