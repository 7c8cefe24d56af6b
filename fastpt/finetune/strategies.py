"""One config selects how a model is adapted; ``prepare`` applies it in place.

``model`` is a task head (``SequenceClassifier`` ...) around a backbone, or a bare fastpt
model (e.g. a ``Decoder`` for text-to-text). Task-head parameters always stay trainable;
the strategy decides what else is, except in the backbone modules the head never runs
(``unused_by_head``: its pre-training heads, and the layers above a head's ``layer``),
which stay frozen under every strategy.

==============  ===========================================================================
full            every parameter the head uses
partial         all but the embeddings and the first ``freeze_layers`` layers
probe           the head only (feature-based: frozen backbone; ``layer`` picks the features)
lora            LoRA factors on ``target_modules`` (names, or "all-linear")
int8_lora       the same on an int8 (LLM.int8) copy of the frozen linears
adapters        bottleneck adapters: Houlsby (after attention and FFN) or Pfeiffer (FFN)
prefix          per-layer key/value prefixes (decoders, encoder-decoders)
prompt          soft prompt tokens prepended to the input embeddings
ia3             learned scales on keys, values and the FFN intermediate
bitfit          biases only
==============  ===========================================================================

A ``Seq2Seq`` (T5) is fine-tuned bare, text-to-text (``labels`` are the decoder's targets),
and has two layer stacks: ``partial`` freezes the shared embeddings, both relative position
biases and the first ``freeze_layers`` layers of *each* stack; adapters and IA3 go in every
layer of both (a decoder layer's adapter follows its self-attention, not its cross-attention);
prefixes go into every attention, self and cross; the soft prompt goes in front of the
encoder's input only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from fastpt.finetune import lora as lora_mod
from fastpt.finetune.heads import SequenceClassifier, backbone_of
from fastpt.finetune.peft_modules import BottleneckAdapter, IA3Linear, WithAdapter
from fastpt.finetune.prefix import add_prefix_tuning
from fastpt.finetune.prompt_tuning import PromptTuned
from fastpt.models import Decoder, Encoder, Seq2Seq

# The attribute where ``prepare`` records its config on the model it returns.
RECORDED_CONFIG = "finetune_config"

# A backbone's own pre-training heads (BERT's MLM and NSP heads, a decoder's LM head): a task
# head reads hidden states, never these.
PRETRAINING_HEADS = ("mlm_head", "nsp_head", "lm_head")

STRATEGIES = ("full", "partial", "probe", "lora", "int8_lora", "adapters", "prefix", "prompt",
              "ia3", "bitfit")


@dataclass
class FinetuneConfig:
    strategy: str = "full"
    freeze_layers: int = 0                 # partial: how many bottom layers to freeze
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: object = None          # None: q_proj, v_proj; or a list; or "all-linear"
    use_rslora: bool = False
    int8_threshold: float = 6.0
    adapter_kind: str = "houlsby"          # or "pfeiffer"
    adapter_reduction: int = 16
    num_virtual_tokens: int = 20           # prompt tuning
    prompt_init_text: list = field(default_factory=list)  # token ids to initialise from
    prefix_length: int = 10
    prefix_projection: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.adapter_kind not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter_kind must be 'houlsby' or 'pfeiffer', got {self.adapter_kind!r}")
        for name in ("lora_r", "adapter_reduction", "num_virtual_tokens", "prefix_length",
                     "freeze_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"FinetuneConfig.{name} must be an int, got {type(value).__name__} "
                                f"{value!r}")
        for name in ("use_rslora", "prefix_projection"):  # a JSON "false" would count as true
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"FinetuneConfig.{name} must be true or false, got {type(value).__name__} "
                                f"{value!r}")
        tm = self.target_modules
        if not (tm is None or isinstance(tm, str)
                or isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm)):
            raise TypeError(f"FinetuneConfig.target_modules must be None, 'all-linear', a module name "
                            f"or a list of names, got {tm!r}")
        ids = self.prompt_init_text
        if not (isinstance(ids, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise TypeError(f"FinetuneConfig.prompt_init_text must be a list of token ids (ints >= 0), "
                            f"got {ids!r}" + (": encode the text with the model's tokenizer "
                                              "(tokenizer.encode(text).ids)" if isinstance(ids, str) else ""))
        if isinstance(self.int8_threshold, bool) or not isinstance(self.int8_threshold, (int, float)):
            raise TypeError(f"FinetuneConfig.int8_threshold must be a number, got {self.int8_threshold!r}")
        lora_mod.check_lora_hyperparameters(self.lora_alpha, self.lora_dropout)
        for name in ("lora_r", "adapter_reduction", "num_virtual_tokens", "prefix_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.freeze_layers < 0 or not self.int8_threshold > 0:
            raise ValueError("freeze_layers must be >= 0 and int8_threshold > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _head_parameters(model: nn.Module) -> list:
    backbone = backbone_of(model)
    if backbone is model:
        return []
    inside = {id(p) for p in backbone.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


# Strategies that find layers, attention or embeddings by the structure of fastpt's models.
_NEEDS_A_FASTPT_MODEL = ("partial", "adapters", "prefix", "prompt", "ia3")


def prepare(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    """Apply ``config`` in place and return the model to train (prompt tuning wraps it)."""
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"prepare's config must be a FinetuneConfig, got {type(config).__name__} "
                        f"(build one: FinetuneConfig(**settings))")
    # A second prepare would stack a strategy on the first (IA3 scales on IA3 scales, LoRA in
    # LoRA), or fail half-way on modules the first one replaced. Checked in every submodule:
    # prompt tuning records its config on the wrapper, and a prepared bare model may be put
    # under a head afterwards.
    for m in model.modules():
        recorded = getattr(m, RECORDED_CONFIG, None)
        if recorded is not None:
            strategy = getattr(recorded, "strategy", recorded)
            raise ValueError(f"the model was already prepared with strategy {strategy!r}; prepare a fresh model")
    config.__post_init__()  # again: a field may have been changed since it was built
    backbone = backbone_of(model)
    if config.strategy in _NEEDS_A_FASTPT_MODEL and not isinstance(backbone, (Encoder, Decoder, Seq2Seq)):
        # an nn.Linear failed as "'Linear' object has no attribute 'config'"
        raise TypeError(f"strategy {config.strategy!r} needs a fastpt Encoder, Decoder or Seq2Seq (bare or "
                        f"under a task head), got {type(backbone).__name__}")
    _check_sizes_fit(backbone, config)
    if config.strategy == "full":
        model.requires_grad_(True)
        _freeze_unused_by_head(model)
        setattr(model, RECORDED_CONFIG, config)
        return model
    if config.strategy == "probe" and backbone is model:
        raise ValueError(f"strategy 'probe' trains a task head only, and this bare {type(model).__name__} "
                         "has none: wrap an Encoder or Decoder in SequenceClassifier, TokenClassifier "
                         "or QuestionAnswering first, or pick another strategy")
    model.requires_grad_(False)
    apply = {"partial": _partial, "probe": lambda b, c: None, "lora": _lora, "int8_lora": _int8_lora,
             "adapters": _adapters, "prefix": _prefix, "ia3": _ia3, "bitfit": _bitfit}
    wrapped = model
    if config.strategy == "prompt":
        wrapped = PromptTuned(model, config.num_virtual_tokens, config.prompt_init_text)
    elif config.strategy in ("lora", "int8_lora") and backbone is not model:
        apply[config.strategy](backbone, replace(config, target_modules=_lora_targets(model, config)))
    else:
        apply[config.strategy](backbone, config)
    _freeze_unused_by_head(model)
    for p in _head_parameters(model):
        p.requires_grad_(True)
    # What save_adapter saves: a config passed there could differ in numbers no shape shows.
    setattr(wrapped, RECORDED_CONFIG, config)
    return wrapped


def _check_sizes_fit(backbone: nn.Module, c: FinetuneConfig) -> None:
    """Sizes the model bounds: virtual tokens and prefixes take positions (a huge one would
    fail in the allocator, naming no field), and a bottleneck reduction beyond the hidden size
    would leave adapters of zero width."""
    cfg = getattr(backbone, "config", None)
    positions, hidden = getattr(cfg, "max_position_embeddings", None), getattr(cfg, "hidden_size", None)
    sizes = {"prompt": ("num_virtual_tokens", positions, "max_position_embeddings"),
             "prefix": ("prefix_length", positions, "max_position_embeddings"),
             "adapters": ("adapter_reduction", hidden, "hidden_size")}
    name, limit, what = sizes.get(c.strategy, (None, None, None))
    if limit is not None and getattr(c, name) > limit:
        raise ValueError(f"FinetuneConfig.{name}={getattr(c, name)} exceeds this model's {what} ({limit})")


def _reads_pooler(head: nn.Module) -> bool:
    # As SequenceClassifier.forward decides (fastpt/finetune/heads.py): [CLS] through the pooler.
    return (isinstance(head, SequenceClassifier) and head.pooling == "cls"
            and isinstance(head.backbone, Encoder) and head.layer == -1)


def unused_by_head(model: nn.Module) -> list[str]:
    """Paths of the backbone modules that the task head ``model`` never runs into its output:
    the backbone's own pre-training heads, and BERT's pooler unless the head reads it. Trained,
    they would get no gradient, inflate the trainable count and fill the adapter file."""
    backbone = backbone_of(model)
    if backbone is model:  # a bare model (e.g. text-to-text) uses its own heads
        return []
    unused = [n for n in PRETRAINING_HEADS if getattr(backbone, n, None) is not None]
    if getattr(backbone, "pooler", None) is not None and not _reads_pooler(model):
        unused.append("pooler")
    layer, count = getattr(model, "layer", -1), len(_layers(backbone))
    if isinstance(layer, int) and layer != -1 and layer % (count + 1) < count:
        # Features from a lower layer: the layers above it, and a decoder's final norm, never run.
        unused += [f"layers.{i}" for i in range(layer % (count + 1), count)]
        unused += ["final_norm"] if hasattr(backbone, "final_norm") else []
    return unused


def _is_under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _freeze_unused_by_head(model: nn.Module) -> None:
    """Freeze what a strategy marked trainable in modules the head never uses (BitFit's biases,
    partial's layers), but not a tensor shared with a used module (a tied LM head)."""
    backbone, unused = backbone_of(model), unused_by_head(model)
    if not unused:
        return
    used = {id(p) for n, p in backbone.named_parameters(remove_duplicate=False) if not _is_under(n, unused)}
    for n, p in backbone.named_parameters():
        if _is_under(n, unused) and id(p) not in used:
            p.requires_grad_(False)


def _lora_targets(model: nn.Module, c: FinetuneConfig) -> list[str]:
    """LoRA's target paths under a task head: none in a module the head never uses, and, for
    "all-linear", the pooler when the head reads it (as PEFT's all-linear wraps it)."""
    backbone, unused = backbone_of(model), unused_by_head(model)
    everything = lora_mod._targets(backbone, c.target_modules)
    targets = [t for t in everything if not _is_under(t, unused)]
    if not targets:
        raise ValueError(f"LoRA target modules {everything} are all in modules that "
                         f"{type(model).__name__} never uses ({unused}); target the encoder's or "
                         "decoder's layers")
    pooler = getattr(backbone, "pooler", None)
    if c.target_modules == lora_mod.ALL_LINEAR and _reads_pooler(model) and isinstance(pooler, nn.Linear):
        targets.append("pooler")
    return targets


def layer_stacks(backbone) -> list[tuple[str, nn.ModuleList]]:
    """(path, layers) of each stack of layers: ``layers`` of an Encoder or Decoder; the
    encoder's then the decoder's of a Seq2Seq. TypeError for any other model."""
    if isinstance(backbone, Seq2Seq):
        return [("encoder.layers", backbone.encoder.layers), ("decoder.layers", backbone.decoder.layers)]
    if isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        return [("layers", backbone.layers)]
    raise TypeError(f"{type(backbone).__name__} has no stack of layers; expected a fastpt Encoder, "
                    "Decoder or Seq2Seq")


def _layers(backbone) -> nn.ModuleList:
    """The one stack of a head's backbone (heads take no Seq2Seq)."""
    (_, layers), = layer_stacks(backbone)
    return layers


# Input embeddings partial freezes: token, position and segment tables; a Seq2Seq's shared
# table and each stack's relative position bias (HF keeps that in layer 0 of the stack).
_EMBEDDINGS = ("embed", "embeddings", "shared", "encoder.relative_bias", "decoder.relative_bias")


def _partial(backbone, c):
    stacks = layer_stacks(backbone)
    short = [(path, len(layers)) for path, layers in stacks if c.freeze_layers > len(layers)]
    if short:
        where = [f"{n} layers" + (f" in {p}" if len(stacks) > 1 else "") for p, n in short]
        raise ValueError(f"freeze_layers={c.freeze_layers} but the model has {', '.join(where)}")
    frozen = {id(p) for _, layers in stacks for layer in layers[:c.freeze_layers] for p in layer.parameters()}
    embeddings = {id(p) for n, p in backbone.named_parameters() if n.startswith(_EMBEDDINGS)}
    for p in backbone.parameters():
        p.requires_grad_(id(p) not in frozen | embeddings)


def _lora(backbone, c):
    lora_mod.add_lora(backbone, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout,
                      target_modules=c.target_modules, use_rslora=c.use_rslora)


def _int8_lora(backbone, c):
    from fastpt.nn.int8_linear import Int8Linear
    targets = lora_mod._targets(backbone, c.target_modules)
    for path in targets:
        parent, _, leaf = path.rpartition(".")
        owner = backbone.get_submodule(parent) if parent else backbone
        setattr(owner, leaf, Int8Linear.from_linear(getattr(owner, leaf), threshold=c.int8_threshold))
    _lora(backbone, c)


def _ffn_site(layer) -> tuple[nn.Module, str]:
    """(owner, attribute) of the FFN sub-layer whose output an adapter follows."""
    if hasattr(layer, "mlp"):
        return layer, "mlp"
    if hasattr(layer, "fc_out"):
        return layer, "fc_out"
    raise TypeError(f"cannot find the FFN of {type(layer).__name__} (no .mlp or .fc_out)")


def _all_layers(backbone) -> list[nn.Module]:
    return [layer for _, layers in layer_stacks(backbone) for layer in layers]


def _adapters(backbone, c):
    # In a Seq2Seq decoder layer Houlsby's first adapter follows self-attention, as in the
    # encoder: cross-attention is called piecewise by the layer, not as one module.
    d = backbone.config.hidden_size
    for layer in _all_layers(backbone):
        sites = [_ffn_site(layer)] + ([(layer, "attn")] if c.adapter_kind == "houlsby" else [])
        for owner, attr in sites:
            setattr(owner, attr, WithAdapter(getattr(owner, attr), BottleneckAdapter(d, c.adapter_reduction)))


def _prefix(backbone, c):
    add_prefix_tuning(backbone, c.prefix_length, c.prefix_projection)


def _ia3(backbone, c):
    # T-Few scales every attention's keys and values: a Seq2Seq decoder's cross-attention too.
    for layer in _all_layers(backbone):
        for attn in (layer.attn, getattr(layer, "cross_attn", None)):
            if attn is not None:
                attn.k_proj = IA3Linear(attn.k_proj, "output")
                attn.v_proj = IA3Linear(attn.v_proj, "output")
        owner, attr = _ffn_site(layer)
        ffn = getattr(owner, attr)
        down = next((n for n in ("down_proj", "fc_out", "wo") if hasattr(ffn, n)), None)
        down_owner, down_attr = (ffn, down) if down is not None else (owner, attr)
        setattr(down_owner, down_attr, IA3Linear(getattr(down_owner, down_attr), "input"))


def _bitfit(backbone, c):
    biases = [p for n, p in backbone.named_parameters() if n.endswith("bias")]
    if not biases:
        raise ValueError(f"BitFit trains biases, and this {type(backbone).__name__} has none "
                         "(e.g. Llama); pick another strategy")
    for p in biases:
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> dict:
    """Trainable and total *logical* parameters: an int8 weight counts once, as its fp
    original (out x in), not as its packed bytes or scales."""
    from fastpt.nn.int8_linear import Int8Linear
    seen, total, trainable = set(), 0, 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
            seen.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def trainable_parameters_summary(model: nn.Module) -> str:
    """The line print_trainable_parameters prints, for callers that print it their own way."""
    c = count_parameters(model)
    return f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the trainable and total logical parameters (:func:`count_parameters`); returns
    None as PEFT's does, so that a REPL does not show the line twice."""
    print(trainable_parameters_summary(model))
