"""Saving what fine-tuning changed: adapter-only files or a merged full checkpoint.

Adapter-only (``save_adapter``): ``adapter_config.json`` (the ``FinetuneConfig``, the base
model's architecture and task head, and the names of the saved tensors) +
``adapter_model.safetensors`` with every trainable tensor: LoRA factors, adapters, prompts,
prefixes, IA3 scales, BitFit biases and the new task head. ``load_adapter`` applies the same
strategy to a fresh base and loads them, checking that the base matches (architecture, task
head and shapes). Merged
(``save_merged`` / ``load_merged``): LoRA and IA3 folded into the weights, a plain HF-layout
model plus the task head's tensors, no adapter code needed to load it.

Sha256 digests bind the files of one save together (the adapter weights carry their config's,
a merged head's config carries the other files'), and the loaders check them: a save that fails
half-way leaves a folder they refuse, never one they load mixed.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fastpt._atomic import atomic_write, atomic_write_json, sha256_file, sha256_json
from fastpt.finetune.adapter_to_save import (_adapter_tensors, _adapter_to_save, _check_lora_settings, _config_of,
                                             _config_of_adapter)
from fastpt.finetune.folding import _folded
from fastpt.finetune.strategies import FinetuneConfig, backbone_of, prepare
from fastpt.models.hf import CONFIG_NAME, WEIGHTS_NAME

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HEAD_CONFIG, HEAD_WEIGHTS = "head_config.json", "head.safetensors"
_MERGED_FILES = (CONFIG_NAME, WEIGHTS_NAME, HEAD_WEIGHTS)  # what a merged head's config vouches for
# Safetensors metadata of the adapter weights: the digest of the adapter_config.json saved with
# them (metadata, so that adapter_config.json keeps only what PEFT knows).
CONFIG_DIGEST = "fastpt_adapter_config_sha256"
# What the checks below can vet: isfinite is not implemented for float8, and ints are no weights.
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _config_digest(meta) -> str:
    # Of the JSON content, not the file's bytes: re-indenting the file keeps it valid, changing
    # a value does not. The round trip makes a tuple hash as the list it is saved as.
    return sha256_json(json.loads(json.dumps(meta)))


def _base_signature(model) -> dict:
    head = getattr(model, "model", model)  # under prompt tuning's wrapper
    backbone = backbone_of(head)
    config = getattr(backbone, "config", None)
    return {"class": type(backbone).__name__,
            "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
            "head": _head_signature(head)}


def _head_signature(head) -> dict:
    """The task head's class and the settings that pick its features: the same tensors under
    another pooling or layer would load without a word and give other outputs."""
    return {"class": type(head).__name__,
            **{k: getattr(head, k) for k in ("pooling", "layer") if hasattr(head, k)}}


def _check_head(path: str, saved, head: dict) -> None:
    # No head entry: an adapter saved before fastpt recorded it, taken as it is.
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r}: base.head must be an object (the task "
                         f"head's class, pooling and layer), got {saved!r}")
    for field in ("class", "pooling", "layer"):
        if saved.get(field) != head.get(field):
            raise ValueError(f"adapter at {path!r} was saved from a head with {field} {saved.get(field)!r}, "
                             f"not this model's {head.get(field)!r}: load it into a head built as the "
                             f"saved one was")


def save_adapter(model: torch.nn.Module, path: str, config: FinetuneConfig | None = None,
                 adapter_name: str | None = None) -> list[str]:
    """Write the trainable tensors of ``model`` (as prepared by ``prepare``); returns their names.

    The config saved is the one ``prepare`` recorded on the model; a ``config`` given must be
    the same (and must fit the model's LoRA layers), or ``ValueError`` names the fields that differ.
    With several LoRA adapters (``add_lora``), the active one is saved, or ``adapter_name``: its
    factors under PEFT's name ``default`` (what ``load_adapter`` builds), its rank, alpha,
    dropout and target modules in the saved config, and its own name, if another, in
    ``adapter_name``.
    The weights go first, carrying the digest of the config written second: a save that fails
    between the two leaves new weights beside the old config, which ``load_adapter`` refuses
    (it would load them with the old settings, e.g. another LoRA scaling)."""
    config = _config_of(model, config)
    name = _adapter_to_save(model, config, adapter_name)
    if name not in (None, "default"):  # the recorded config describes the adapter prepare added
        config = _config_of_adapter(model, config, name)
    _check_lora_settings(model, config, name)
    tensors = _adapter_tensors(model, name)
    if not tensors:
        raise ValueError("the model has no trainable parameters to save")
    _check_values(tensors, "the model to save")  # load_adapter would refuse the file
    meta = {"finetune": config.to_dict(), "base": _base_signature(model), "tensors": sorted(tensors)}
    if name not in (None, "default"):  # (a default adapter's config keeps the keys it always had)
        meta["adapter_name"] = name
    digest = _config_digest(meta)  # before any write: a config JSON cannot hold fails here
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, WEIGHTS_FILE),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", CONFIG_DIGEST: digest}))
    atomic_write_json(os.path.join(path, CONFIG_FILE), meta)
    return sorted(tensors)


def load_adapter(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Apply the saved strategy to ``model`` (a fresh base under a task head of the saved
    class, pooling and layer) and load the saved tensors; returns the prepared model. The
    config must be the one saved with the weights, and the file may hold only what the
    strategy trains (and the head)."""
    config_file, weights_file = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    try:
        meta = _read_json(config_file)
        tensors, saved = _read_safetensors(weights_file)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path!r} is not a readable fastpt adapter: {e}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("finetune"), dict) and isinstance(meta.get("base"), dict)):
        raise ValueError(f"{config_file!r} is not a fastpt adapter config: it needs the "
                         f"objects 'finetune' and 'base' (what save_adapter writes)")
    # No digest: weights saved before fastpt recorded one. Since the weights are written first,
    # such weights never sit beside a newer config.
    digest = saved.get(CONFIG_DIGEST)
    if digest is not None and digest != _config_digest(meta):
        raise ValueError(f"{config_file!r} is not the config saved with {weights_file!r} (a save that "
                         f"failed between the two files, or an edited or copied file): save the adapter again")
    listed = meta.get("tensors", sorted(tensors))
    if not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
        raise ValueError(f"{config_file!r}: 'tensors' must be a list of tensor names, got {listed!r}")
    if set(listed) != set(tensors):
        raise ValueError(f"{weights_file!r} does not hold the tensors that {config_file!r} lists: absent "
                         f"{sorted(set(listed) - set(tensors))}, not listed {sorted(set(tensors) - set(listed))}")
    base = _base_signature(model)
    if any(base[k] != meta["base"].get(k) for k in ("class", "config")):
        raise ValueError(f"adapter at {path!r} was trained on {meta['base'].get('class')} with config "
                         f"{meta['base'].get('config')}, not on this {base['class']} ({base['config']})")
    _check_head(path, meta["base"].get("head"), base["head"])
    try:
        config = FinetuneConfig(**meta["finetune"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file!r} has invalid fine-tuning settings: {e}") from None
    _check_sizes(model, config, tensors, config_file)
    prepared = prepare(model, config)
    tensors = _without_unused_by_head(prepared, model, tensors)
    _freeze_saved_prefixes(prepared, tensors)
    # Only what the strategy trains: a frozen base weight in the file would silently replace
    # the base's own (the head's new parameters are trainable under every strategy).
    params = {n: p for n, p in prepared.named_parameters() if p.requires_grad}
    _check_saved_tensors(weights_file, tensors, params)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return prepared


def _without_unused_by_head(prepared: torch.nn.Module, head: torch.nn.Module, tensors: dict) -> dict:
    """``tensors`` less those of backbone modules the task head never uses (BERT's MLM and NSP
    heads...), which fastpt trained and saved before it left them out (BitFit, partial, LoRA
    all-linear): they never changed the head's output, so dropping them loses nothing."""
    from fastpt.finetune.strategies import unused_by_head
    backbone = backbone_of(head)
    unused = unused_by_head(head)
    roots = tuple(f"{n}.{u}." for n, m in prepared.named_modules() if m is backbone and n for u in unused)
    return {n: t for n, t in tensors.items() if not n.startswith(roots)} if roots else tensors


def _read_json(file: str):
    """The JSON in ``file``; ``ValueError`` naming it when it is not valid JSON, or nests too
    deep for the decoder (a bare RecursionError would name no file)."""
    with open(file) as f:
        try:
            return json.load(f)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{file!r}: not valid JSON: {e}") from None


def _read_safetensors(file: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file."""
    with safe_open(file, framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, f.metadata() or {}


def _check_sizes(model: torch.nn.Module, config: FinetuneConfig, tensors: dict, file: str) -> None:
    """Sizes that ``prepare`` allocates, checked before it runs against the saved tensors: a
    config asking for 10**11 prompt tokens would otherwise try to allocate terabytes."""
    from fastpt.finetune.prompt_tuning import token_embedding
    suffixes = {"prompt": ("num_virtual_tokens", ("prompt.embeddings",)),
                "prefix": ("prefix_length", ("prefix_tuning.embedding.weight", "prefix_tuning.prefix"))}
    if config.strategy not in suffixes:
        return
    field, names = suffixes[config.strategy]
    value = getattr(config, field)
    saved = [tuple(t.shape[:1]) for n, t in tensors.items() if n.endswith(names)]
    if saved != [(value,)]:
        raise ValueError(f"{file!r}: finetune.{field} is {value}, but the saved tensors hold "
                         f"{[s[0] for s in saved if s] or 'no'} {field.replace('_', ' ')}")
    if config.strategy == "prompt" and config.prompt_init_text:
        vocab = token_embedding(backbone_of(model)).num_embeddings
        if max(config.prompt_init_text) >= vocab:
            raise ValueError(f"{file!r}: finetune.prompt_init_text has token ids >= the vocabulary "
                             f"size {vocab}: {max(config.prompt_init_text)}")


def _freeze_saved_prefixes(model: torch.nn.Module, tensors: dict) -> None:
    # A prefix saved after PrefixTuning.freeze() (its MLP dropped after training, as the paper
    # does) holds the computed prefix itself: load it into a frozen prefix module.
    from fastpt.finetune.prefix import PrefixTuning
    for name, module in model.named_modules():
        if isinstance(module, PrefixTuning) and module.prefix is None and f"{name}.prefix" in tensors:
            module.freeze()


def _pooler_lora_saved_before_it_was_targeted(tensors: dict, expected: dict) -> set:
    """The pooler's LoRA factors, where the file holds none of them: "all-linear" targets the
    pooler of a head that reads it, which it did not before; an adapter saved then has no
    pooler LoRA, and the factors' init (B = 0) gives that adapter's outputs exactly."""
    pooler = {n for n in expected if re.search(r"(^|\.)pooler\.lora_[AB]\.", n)}
    return pooler if not pooler & set(tensors) else set()


def _check_saved_tensors(file: str, tensors: dict, expected: dict) -> None:
    # The file must hold exactly the expected parameters, each with its shape: a missing one
    # would stay at its init (a silently different model), an unexpected one would overwrite a
    # weight that is not the file's to change. The values must be finite floats; the dtype
    # check comes first, as isfinite is not implemented for every dtype (float8).
    unknown = sorted(set(tensors) - set(expected))
    absent = sorted(set(expected) - set(tensors) - _pooler_lora_saved_before_it_was_targeted(tensors, expected))
    wrong = sorted(n for n in tensors if n in expected and expected[n].shape != tensors[n].shape)
    if unknown or absent or wrong:
        raise ValueError(f"the tensors of {file!r} do not fit this model: unknown (or not trained by "
                         f"the strategy) {unknown}, absent {absent}, mis-shaped "
                         f"{[(n, tuple(tensors[n].shape), tuple(expected[n].shape)) for n in wrong]}")
    _check_values(tensors, repr(file))


def _check_values(tensors: dict, where: str) -> None:
    """Each tensor a finite float of a loadable dtype; ``where`` names their file, or the model
    the savers take them from (what the loaders refuse is never written)."""
    for name, t in tensors.items():
        if t.dtype not in LOADABLE_DTYPES:
            raise ValueError(f"tensor {name!r} of {where} is {t.dtype}, not a floating-point tensor of "
                             f"a loadable dtype ({', '.join(str(d) for d in LOADABLE_DTYPES)})")
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} of {where} has NaN or infinite values")


_HEADS = {}


def _head_classes() -> dict:
    if not _HEADS:
        from fastpt.finetune.heads import QuestionAnswering, SequenceClassifier, TokenClassifier
        _HEADS.update({c.__name__: c for c in (SequenceClassifier, TokenClassifier, QuestionAnswering)})
    return _HEADS


def save_merged(model: torch.nn.Module, path: str) -> None:
    """Merged full checkpoint: LoRA and IA3 folded into the weights, written as a plain HF
    layout model (``save_pretrained``) plus, for a task head, ``head.safetensors`` and
    ``head_config.json``. ``model`` itself is left as it was (its adapters, weights, trainable
    parameters and merged state): training can go on after the save. Strategies that add
    modules with no weight to fold into (adapters, prefix, prompt) raise ``ValueError``: save
    them with ``save_adapter``."""
    from fastpt.finetune.peft_modules import WithAdapter
    from fastpt.finetune.prefix import PrefixAttention
    from fastpt.finetune.prompt_tuning import PromptTuned
    if isinstance(model, PromptTuned):
        raise ValueError("prompt tuning has no weights to merge into; use save_adapter")
    backbone = backbone_of(model)
    if any(isinstance(m, (WithAdapter, PrefixAttention)) for m in backbone.modules()):
        raise ValueError("adapters and prefix tuning add modules that cannot be merged; use save_adapter")
    # Checked before anything is written: load_merged (and from_pretrained) refuse such values.
    head = {} if backbone is model else \
        {n: p.detach().contiguous() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    _check_values(head, "the model to save")
    with _folded(backbone):
        for name, p in backbone.named_parameters():
            if p.is_floating_point() and p.dtype in LOADABLE_DTYPES and not torch.isfinite(p).all():
                raise ValueError(f"tensor 'backbone.{name}' of the model to save has NaN or infinite "
                                 f"values (after folding its adapters)")
        backbone.save_pretrained(path)
    if backbone is model:
        # A head left by an earlier save into this folder would be put back on this model by
        # load_merged. If the removal never happens (a crash), the head's recorded digests no
        # longer match the new weights, and load_merged refuses it.
        for name in (HEAD_CONFIG, HEAD_WEIGHTS):  # the config first: it is what marks a head
            if os.path.lexists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        return
    atomic_write(os.path.join(path, HEAD_WEIGHTS), lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    # Written last, with the digests of the files it goes with: a save that fails before this
    # leaves the old head config, which no longer matches them (load_merged refuses the folder).
    meta = {"class": type(model).__name__, "num_labels": getattr(model, "num_labels", None),
            "pooling": getattr(model, "pooling", None), "layer": model.layer,
            "files": {n: sha256_file(os.path.join(path, n)) for n in _MERGED_FILES}}
    atomic_write_json(os.path.join(path, HEAD_CONFIG), meta)


def _check_merged_digests(path: str, files, meta_file: str) -> None:
    # No 'files': a head saved before fastpt recorded digests, taken as it is.
    if files is None:
        return
    if not (isinstance(files, dict) and set(files) == set(_MERGED_FILES)):
        raise ValueError(f"{meta_file}: 'files' must give the sha256 of each of {list(_MERGED_FILES)}")
    stale = [n for n in _MERGED_FILES if not os.path.isfile(os.path.join(path, n))
             or sha256_file(os.path.join(path, n)) != files[n]]
    if stale:
        raise ValueError(f"{meta_file} was saved with other {', '.join(stale)} than the ones in {path!r} "
                         f"(a save into this folder that failed half-way, or files copied from another "
                         f"model): save the model again")


def load_merged(path: str) -> torch.nn.Module:
    """A model written by ``save_merged``: the plain backbone, under its head if it had one."""
    from fastpt.models import from_pretrained
    backbone = from_pretrained(path)
    meta_file, head_file = os.path.join(path, HEAD_CONFIG), os.path.join(path, HEAD_WEIGHTS)
    if not os.path.isfile(meta_file):
        return backbone
    try:
        meta = _read_json(meta_file)
        tensors = load_file(head_file)
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path!r} has no readable task head: {e}") from None
    if isinstance(meta, dict) and not isinstance(meta.get("class"), str):  # a list is no dict key
        raise ValueError(f"{meta_file}: 'class' must be the head's class name, one of "
                         f"{sorted(_head_classes())}, got {meta.get('class')!r}")
    cls = _head_classes().get(meta.get("class")) if isinstance(meta, dict) else None
    if cls is None:
        raise ValueError(f"{meta_file}: unknown head class {meta.get('class') if isinstance(meta, dict) else meta!r}")

    def build():
        try:
            kwargs = {"layer": meta["layer"]}
            if meta["class"] == "SequenceClassifier":
                kwargs["pooling"] = meta["pooling"]
            args = (backbone,) if meta["class"] == "QuestionAnswering" else (backbone, meta["num_labels"])
            return cls(*args, **kwargs)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_file} does not describe a {meta['class']} head: {e!r}") from None
    # First on the meta device (no memory), so that a num_labels of 10**10 meets the shape
    # check before the head is allocated.
    with torch.device("meta"):
        shapes = {n: p for n, p in build().named_parameters() if not n.startswith("backbone.")}
    _check_saved_tensors(head_file, tensors, shapes)
    _check_merged_digests(path, meta.get("files"), meta_file)
    model = build()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model
