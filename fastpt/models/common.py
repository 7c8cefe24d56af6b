"""Pieces shared by the model families: the attention block, activations, losses, and the
base class (``use_fused`` switch, Hugging Face save/load, generation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpt.models._attention import attend
from fastpt.nn.linear import ACTIVATIONS, Linear
from fastpt.ops.gemm import linear

IGNORE_INDEX = -100


def check_ids(name: str, ids: Tensor, limit: int, limit_name: str) -> None:
    """Indices into an embedding (token, position or segment ids): integer and, on CPU, in
    [0, limit), with a message naming them (torch's own is "index out of range in self"). The
    range is not read on GPUs (a sync per call) nor while compiling (it reads the values)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got {ids.dtype}")
    if ids.numel() and ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit_name}={limit}), got values in [{lo}, {hi}]")


def check_input_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Token ids: a (batch, length) integer tensor within the vocabulary."""
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, length), got shape {tuple(ids.shape)}")
    check_ids(name, ids, vocab_size, "vocab_size")


def check_logits_to_keep(logits_to_keep) -> None:
    # A negative one would slice from the front: x[:, 2:] for -2.
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: all positions), got {logits_to_keep!r}")


def check_inputs_embeds(inputs_embeds, hidden_size: int) -> None:
    """(B, T, hidden_size) floats: the layers would fail on another shape or dtype with an
    error naming neither (and integer embeddings would be taken as numbers)."""
    if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 or \
            inputs_embeds.shape[-1] != hidden_size:
        shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, Tensor) else type(inputs_embeds).__name__
        raise ValueError(f"inputs_embeds must be (batch, length, hidden_size={hidden_size}), got {shape}")
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")


def activation(name: str):
    """HF ACT2FN names: gelu (erf), gelu_new (tanh approximation, GPT-2/T5), relu, silu."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    return ACTIVATIONS[name]


def plain_linear(layer: nn.Module) -> bool:
    """A fastpt ``Linear`` whose forward is its own: not wrapped (LoRA), no hooks, forward not
    replaced. Only for such layers may a model call ``Linear`` methods other than forward."""
    module = nn.modules.module  # torch's global hooks (private names: absent means none)
    return (type(layer) is Linear and "forward" not in layer.__dict__
            and not (layer._forward_hooks or layer._forward_pre_hooks
                     or getattr(module, "_global_forward_hooks", None)
                     or getattr(module, "_global_forward_pre_hooks", None)))


def linear_activation(layer: nn.Module, x: Tensor, name: str) -> Tensor:
    """``activation(name)(layer(x))``; one fused call (``Linear.forward_activation``) for a
    ``plain_linear`` layer."""
    return layer.forward_activation(x, name) if plain_linear(layer) else activation(name)(layer(x))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy in float32, labels == -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token loss: position t predicts labels[t + 1] (labels = input_ids is the usual)."""
    return cross_entropy(logits[:, :-1], labels[:, 1:])


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (LoRA and adapters find them
    by name), GQA (``num_kv_heads`` < ``num_heads``), and an optional KV cache.

    Shapes: x (B, T, d) -> q (B, H, T, D) as a transposed view of (B, T, H, D) (fastpt's
    RoPE and the attention read such views in place, no copy)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 bias: bool, out_bias: bool | None = None, dropout: float = 0.0,
                 scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.dropout = scale, dropout
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=bias if out_bias is None else out_bias)
        self.use_fused = True
        # (weight, bias) of q/k/v stacked, set by generate for its call (generation._decode_weights).
        self.fused_qkv: tuple[Tensor, Tensor | None] | None = None

    def _projection_input(self, x: Tensor) -> Tensor:
        """x, or x cast to bf16 once where q, k and v would each cast it for oneDNN's packed
        bf16 product (bf16 autocast inference, plain fastpt Linears): the same values."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if (x.dtype == torch.float32 and all(plain_linear(p) and p.use_fused for p in projections)
                and self.q_proj._packed_operands(x) is not None):
            return x.to(torch.bfloat16)
        return x

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def project_q(self, x: Tensor) -> Tensor:
        return self._heads(self.q_proj(x), self.num_heads)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.k_proj(x), self.num_kv_heads), self._heads(self.v_proj(x), self.num_kv_heads)

    def attend_and_project(self, q: Tensor, k: Tensor, v: Tensor, **masks) -> Tensor:
        out = attend(q, k, v, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                     use_fused=self.use_fused, **masks)
        B, H, T, D = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, x: Tensor, *, rotary=None, position_ids: Tensor | None = None,
                cache=None, layer_idx: int = 0, causal: bool = False,
                key_padding_mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Self-attention of x (B, T, d). ``rotary``: a RotaryEmbedding applied to q and k at
        ``position_ids``; ``cache``: a KVCache whose earlier keys/values are attended too."""
        if self.fused_qkv is not None:  # one matrix-vector product instead of three
            H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            project = linear if self.use_fused else F.linear
            q, k, v = project(x, *self.fused_qkv).split([H * D, Hkv * D, Hkv * D], -1)
            q, k, v = self._heads(q, H), self._heads(k, Hkv), self._heads(v, Hkv)
        else:
            x = self._projection_input(x)
            q = self.project_q(x)
            k, v = self.project_kv(x)
        if rotary is not None:
            q, k = rotary(q, k, position_ids)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
            if k.dtype != q.dtype:  # a float32 cache under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        return self.attend_and_project(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                       attn_bias=attn_bias)


def init_normal_(module: nn.Module, std: float) -> None:
    """N(0, std) weights for linears and embeddings, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif hasattr(m, "weight") and type(m).__name__ == "RMSNorm" and m.weight is not None:
            nn.init.ones_(m.weight)


def layers_to_run(layers: nn.ModuleList, num_layers: int | None) -> nn.ModuleList:
    """The first ``num_layers`` of ``layers`` (all when None), refusing a count the model lacks."""
    if num_layers is None:
        return layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 0 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be an int in [0, {len(layers)}] (this model's layer count), "
                         f"got {num_layers!r}")
    return layers[:num_layers]


def key_padding(attention_mask: Tensor | None, shape: tuple[int, int] | None = None,
                name: str = "attention_mask") -> Tensor | None:
    """(B, S) bool of the keys to attend, or None when every key may be attended. ``shape``:
    the (B, S) that ``name`` must have, checked first: an all-ones mask of any shape would
    otherwise pass as None."""
    if attention_mask is None:
        return None
    if shape is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be (batch, keys) = {tuple(shape)}, got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(torch.bool)
    return None if bool(mask.all()) else mask


def first_label_outside(labels: Tensor, n_classes: int) -> int | None:
    """Flat index of the first label outside [0, n_classes) that is not IGNORE_INDEX, else None.
    Like ``check_ids``, values are read on the CPU only (on a GPU the answer would cost a sync
    per call) and not while compiling."""
    if not labels.numel() or labels.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    bad = ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_classes))).reshape(-1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def check_labels(labels: Tensor, shape: tuple | None, vocab_size: int, *, what: str = "(B, T)",
                 like: str = " like the inputs", classes: str = "vocab_size", kind: str = "token ids") -> None:
    """Labels: of ``shape`` (``what``; None: any (batch, length)), integer, and (on CPU, see
    ``check_ids``) each in [0, vocab_size) or IGNORE_INDEX; torch's own errors name neither.
    Token labels by default; ``classes`` and ``kind`` name the limit and the ids otherwise
    (a classifier's num_labels and class ids)."""
    if shape is None and labels.dim() != 2:
        raise ValueError(f"labels must be (batch, length), got shape {tuple(labels.shape)}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must be {what} = {tuple(shape)}{like}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer {kind}, got {labels.dtype}")
    at = first_label_outside(labels, vocab_size)
    if at is not None:
        raise ValueError(f"labels must lie in [0, {classes}={vocab_size}) or be {IGNORE_INDEX} "
                         f"(ignored), got {int(labels.reshape(-1)[at])}")


def positions_from_mask(attention_mask: Tensor, T: int) -> Tensor:
    """Position ids (B, T) of the last T tokens: count of real tokens before each (left
    padding gets position 0, never read since pad keys are masked)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)[:, -T:]


class PreTrainedModel(nn.Module):
    """Base of the fastpt models: ``use_fused`` (True: fastpt's fused ops; False: the same
    weights on the eager reference ops), HF-layout save/load, generation."""

    config_class: type

    @property
    def use_fused(self) -> bool:
        return self._use_fused

    @use_fused.setter
    def use_fused(self, value: bool) -> None:
        self._use_fused = bool(value)
        for m in self.modules():
            if m is not self and hasattr(m, "use_fused"):
                m.use_fused = bool(value)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` (HF field names) and ``model.safetensors`` (HF parameter
        names) into the folder ``path``, each atomically."""
        from fastpt.models.hf import save_pretrained
        save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | str | None = None, use_fused: bool = True,
                        accept_edited_config: bool = False):
        """Load a HF-layout folder; see :func:`fastpt.models.hf.from_pretrained`."""
        from fastpt.models.hf import from_pretrained
        model = from_pretrained(path, dtype=dtype, use_fused=use_fused, accept_edited_config=accept_edited_config)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def generate(self, *args, **kwargs) -> Tensor:
        """See :func:`fastpt.models.generation.generate`."""
        if not hasattr(self, "new_cache"):  # generation runs the model step by step on a KV cache
            raise TypeError(f"{type(self).__name__} is not generative: generate needs a Decoder or "
                            f"Seq2Seq model")
        from fastpt.models.generation import generate
        return generate(self, *args, **kwargs)
