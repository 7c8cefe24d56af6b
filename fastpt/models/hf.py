"""Hugging Face interop: HF parameter names, safetensors files, and conversion from/to
``transformers`` models (BERT, GPT-2, Llama, T5); config.json fields in :mod:`hf_config`.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from fastpt._atomic import atomic_write
from fastpt.models.config import DecoderConfig, EncoderConfig, Seq2SeqConfig
from fastpt.models.hf_config import from_hf_config, to_hf_config  # noqa: F401  (re-exported)
from fastpt.models.hf_files import (  # noqa: F401  (CheckpointError and the readers re-exported)
    CONFIG_NAME, INDEX_NAME, WEIGHT_DTYPES, WEIGHTS_NAME, CheckpointError, as_weight_dtype, read_config,
    read_safetensors, read_safetensors_header, weight_files)

CONFIG_SHA256 = "fastpt_config_sha256"
"""Key of model.safetensors' metadata holding :func:`_config_sha256` of the config saved
with it (transformers ignores it; files written by transformers lack it)."""


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


def model_for_config(config, use_fused: bool = True):
    from fastpt.models.decoder import Decoder
    from fastpt.models.encoder import Encoder
    from fastpt.models.seq2seq import Seq2Seq
    cls = {EncoderConfig: Encoder, DecoderConfig: Decoder, Seq2SeqConfig: Seq2Seq}[type(config)]
    return cls(config, use_fused=use_fused)


# ---------------------------------------------------------------- state dicts

def hf_state_dict(model) -> dict[str, Tensor]:
    """The model's tensors under HF names (tied copies not repeated), detached."""
    ours = model.state_dict()
    with torch.no_grad():
        return {e.hf: e.pack(*(ours[n] for n in e.ours)).detach() for e in _entries(model.config)}


def load_hf_state_dict(model, tensors: dict[str, Tensor], *, allow_missing: Callable[[str], bool] | None = None,
                       source: str = "checkpoint") -> list[str]:
    """Copy HF-named ``tensors`` into ``model`` after checking names and shapes.

    Raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped tensor
    (tied copies under their alias names are accepted, if equal to the tensor they copy).
    ``allow_missing(name)`` marks tensors that may be absent (they keep their initial
    values); returns those names. Meta tensors (``model`` on the meta device too) check
    names and shapes only, without reading or allocating any data."""
    entries = _entries(model.config)
    aliases = _aliases(model.config)
    tensors = dict(tensors)
    untied = []  # the model has one tensor for both names: keeping either would drop the other
    for alias, canonical in aliases.items():
        if alias in tensors:
            value = tensors.pop(alias)
            if canonical not in tensors:
                tensors[canonical] = value
            elif not _identical(value, tensors[canonical]):
                untied.append(f"{alias} ({value.dtype}, {list(value.shape)}) differs from {canonical} "
                              f"({tensors[canonical].dtype}, {list(tensors[canonical].shape)})")
    expected = {e.hf: e for e in entries}
    current = model.state_dict()
    missing = [n for n in expected if n not in tensors and not (allow_missing and allow_missing(n))]
    skipped = [n for n in expected if n not in tensors and n not in missing]
    unexpected = [n for n in tensors if n not in expected and not any(p.search(n) for p in _IGNORED)]
    shapes = {}
    for name, e in expected.items():
        if name in tensors:
            want = tuple(e.pack(*(current[n] for n in e.ours)).shape)
            if tuple(tensors[name].shape) != want:
                shapes[name] = (tuple(tensors[name].shape), want)
    # Weights are floats (an integer tensor would be cast into garbage) and finite (NaN or
    # inf weights make every output NaN, far from the file that caused it). float8 weights
    # come with scale tensors fastpt does not read: copied as they are they would be wrong.
    not_float = [f"{n} ({t.dtype})" for n, t in tensors.items() if n in expected and not t.is_floating_point()]
    float8 = [f"{n} ({t.dtype})" for n, t in tensors.items()
              if n in expected and t.is_floating_point() and t.dtype not in WEIGHT_DTYPES]
    not_finite = [n for n, t in tensors.items() if n in expected and t.dtype in WEIGHT_DTYPES
                  and not t.is_meta and not torch.isfinite(t).all()]
    overflow = _out_of_range(tensors, {n: current[e.ours[0]].dtype for n, e in expected.items()}, not_finite)
    if missing or unexpected or shapes or not_float or float8 or not_finite or overflow or untied:
        lines = [f"{source} does not fit {type(model).__name__} ({model.config.model_type}):"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        for name, (got, want) in shapes.items():
            lines.append(f"  mis-shaped tensor {name}: file has {list(got)}, model expects {list(want)}")
        if not_float:
            lines.append(f"  not floating-point ({len(not_float)}): {', '.join(not_float)}")
        if float8:
            lines.append(f"  unsupported floating-point dtype ({len(float8)}; fastpt reads float16, bfloat16, "
                         f"float32 and float64): {', '.join(float8)}")
        if not_finite:
            lines.append(f"  NaN or infinite values ({len(not_finite)}): {', '.join(not_finite)}")
        if overflow:
            lines.append(f"  values too large for the model's dtype, they would become inf ({len(overflow)}; "
                         f"load with a wider dtype): {', '.join(overflow)}")
        for text in untied:
            lines.append(f"  tied tensors differ (the model shares one tensor for both; "
                         f"tie_word_embeddings in the config?): {text}")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for name, e in expected.items():
            if name in tensors:
                for our, value in zip(e.ours, e.unpack(tensors[name])):
                    current[our].copy_(value)
    return skipped


def _out_of_range(tensors: dict[str, Tensor], dtypes: dict[str, torch.dtype], skip: list[str]) -> list[str]:
    """The tensors (of those named in ``dtypes``, less ``skip``) holding finite values that the
    copy into the model's dtype ``dtypes[name]`` would turn into inf: a float64 file's 1e300
    in a float32 model, a float32 file's 1e5 in a float16 one. Such a model is as wrong as
    one with NaN weights, and nothing would say why."""
    out = []
    for name, t in tensors.items():
        want = dtypes.get(name)
        if (want is None or name in skip or t.is_meta or t.dtype not in WEIGHT_DTYPES
                or want not in WEIGHT_DTYPES or torch.finfo(t.dtype).max <= torch.finfo(want).max):
            continue
        # Rounding is monotone: some value becomes inf exactly when the extremes do (no
        # full-size converted copy of every tensor).
        lo, hi = torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
        if not bool(torch.isfinite(torch.stack([lo, hi]).to(want)).all()):
            out.append(f"{name} (max |value| {max(-float(lo), float(hi)):.3g} > {torch.finfo(want).max:.3g}, "
                       f"the largest {str(want).removeprefix('torch.')})")
    return out


def _config_sha256(config) -> str:
    """sha256 of the fastpt config, not of config.json's bytes: reformatting config.json, or
    editing fields fastpt does not read, keeps the weights loadable."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def _identical(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of a file are one tied tensor saved twice: same dtype, shape and
    bytes (NaN-safe, and defined for every dtype). Meta tensors: same shape."""
    if a.is_meta or b.is_meta:
        return a.shape == b.shape
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


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
