"""fastpt forwards for Hugging Face modules, applied by swapping a module's class for a
subclass (``module.__class__ = Patched``): parameters, buffers, state-dict keys, ``isinstance``
checks and wrappers such as peft's LoRA layers stay as they are, and unpatching restores the
original class. Each forward here is the HF forward with the kernel swapped in."""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops.cross_entropy import cross_entropy
from fastpt.ops.gemm import linear
from fastpt.ops.rms_norm import rms_norm
from fastpt.ops.rope import rope
from fastpt.ops.swiglu import swiglu

_SUBCLASSES: dict[tuple[type, str], type] = {}


def rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    # LlamaRMSNorm / T5LayerNorm: weight * x / sqrt(mean(x^2) + eps), statistics in float32.
    # A weight of another dtype (HF keeps some norms in fp32 in fp16 / bf16 models): HF's own
    # forward, whose output dtype (promoted, or the weight's for T5) the next layer expects.
    if self.weight.dtype != hidden_states.dtype:
        return type(self)._fastpt_original.forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def linear_forward(self, x: Tensor) -> Tensor:
    # nn.Linear; fastpt.ops.linear is F.linear where fastpt's GEMM is not the faster one.
    return linear(x, self.weight, self.bias)


def swiglu_mlp_forward(self, x: Tensor) -> Tensor:
    # LlamaMLP: down(silu(gate(x)) * up(x)); the projections may be peft LoRA layers.
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's apply_rotary_pos_emb on (B, H, T, D) q and (B, Hkv, T, D) k with fastpt's kernel.

    HF hands over cos/sin already gathered per position, (B or 1, T, 2R) = cat(freqs, freqs)
    (times the rope scaling). fastpt reads (P, R) tables by row index, so the gathered rows
    become the table and row b*T + t is position (b, t).
    """
    Bc, T, two_r = cos.shape
    r = two_r // 2
    cos_table = cos[..., :r].reshape(Bc * T, r)
    sin_table = sin[..., :r].reshape(Bc * T, r)
    # One shared table (Bc == 1, the usual case): rows 0..T-1 are the kernel's default positions.
    rows = None if Bc == 1 else torch.arange(Bc * T, device=q.device).view(Bc, T)
    return rope(q, k, cos_table, sin_table, rows, layout="half")


def llama_attention_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None,
                            cache=None, past_key_values=None, **kwargs):
    # LlamaAttention.forward (also Mistral, Qwen2) with the rotary embedding on fastpt.ops.rope.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rope(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    # Qwen2 keeps the window on the module, Mistral on the config; the mask already applies it.
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        sliding_window=sliding_window, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Tensor | None = None, **kwargs) -> Tensor:
    # transformers' ForCausalLMLoss (shift, flatten, mean or sum / num_items_in_batch) on
    # fastpt.ops.cross_entropy: no float32 copy of the logits, no log-softmax kept for backward.
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.reshape(-1, vocab_size), shift_labels, ignore_index=ignore_index,
                         num_items=num_items_in_batch)


def _get_loss_function(self):
    # PreTrainedModel.loss_function, with fastpt's loss for the causal-LM loss it would pick.
    # A loss the user assigned (model.loss_function = f) is theirs to keep.
    if "_loss_function" in self.__dict__:
        return self._loss_function
    original = type(self)._fastpt_original.loss_function.fget(self)
    return causal_lm_loss if getattr(original, "__name__", None) == "ForCausalLMLoss" else original


def _set_loss_function(self, value):
    self._loss_function = value


# Patched causal LMs get this property (HF's models call self.loss_function(logits=...)).
CAUSAL_LM_LOSS = {"loss_function": property(_get_loss_function, _set_loss_function)}


def patched_class(original: type, kind: str, forward, extra: dict | None = None) -> type:
    """The (cached) subclass of ``original`` whose forward is ``forward`` (None: the original's)
    and which also defines ``extra``."""
    key = (original, kind)
    if key not in _SUBCLASSES:
        body = {"_fastpt_original": original, "_fastpt_kind": kind, "__module__": __name__, **(extra or {})}
        if forward is not None:
            body["forward"] = forward
        # The original's name: HF writes type(model).__name__ into config.json's "architectures"
        # (and matches _no_split_modules etc. by class name), so a patched model saves as the
        # original. The class lives in _SUBCLASSES only, so pickling goes through __reduce_ex__.
        body.update(__qualname__=original.__qualname__, __reduce_ex__=_reduce_ex)
        _SUBCLASSES[key] = type(original.__name__, (original,), body)
    return _SUBCLASSES[key]


def _reduce_ex(self, protocol):
    # pickle / torch.save / deepcopy of a patched module: the original class's reduction
    # (the dynamic subclass is not importable by name), rebuilt as patched by _rebuild_patched.
    cls = type(self)
    original = cls._fastpt_original
    reduced = super(cls, self).__reduce_ex__(protocol)
    if not (isinstance(reduced, tuple) and len(reduced) >= 2):
        return reduced
    args = tuple(original if a is cls else a for a in reduced[1])
    return (_rebuild_patched, (original, cls._fastpt_kind, reduced[0], args), *reduced[2:])


def _rebuild_patched(original: type, kind: str, constructor, args):
    obj = constructor(*args)
    forward, extra = _KINDS[kind]
    obj.__class__ = patched_class(original, kind, forward, extra)
    # unpickled in a fresh process: the model's config may name the "fastpt" attention
    from fastpt.patch.attention import register
    register()
    return obj


def is_patched(module) -> bool:
    return "_fastpt_original" in type(module).__dict__


def swap(module, kind: str, forward, extra: dict | None = None) -> None:
    module.__class__ = patched_class(type(module), kind, forward, extra)


def restore(module) -> None:
    module.__class__ = type(module)._fastpt_original


def causal_lm_forward(self, input_ids=None, labels=None, **kwargs):
    # LlamaForCausalLM.forward (also Mistral, Qwen2) while training with labels: the loss of
    # the shifted tokens straight from the hidden states with fastpt.models.loss's chunked
    # linear cross-entropy, so the (B, T, V) logits and their gradient never exist; the output
    # has loss and no logits (as Liger-Kernel's fused loss). Anything else is HF's forward:
    # also a loss the user assigned (model.loss_function = f) and labels already shifted by
    # the caller (shift_labels), which the fused path would not honour.
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastpt.models.loss import linear_cross_entropy

    original = type(self)._fastpt_original.forward
    fusable = (self.training and labels is not None and kwargs.get("num_items_in_batch") is None
               and kwargs.get("shift_labels") is None and "_loss_function" not in self.__dict__
               and _plain_linear_head(self.lm_head))
    if not fusable:
        return original(self, input_ids=input_ids, labels=labels, **kwargs)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(input_ids=input_ids, return_dict=True, **kwargs)
    hidden = outputs.last_hidden_state[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1))
    out = CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out


def _plain_linear_head(head) -> bool:
    """Whether the LM head's output is exactly hidden @ weight.T, which the fused loss computes
    from the weight alone: an nn.Linear (or fastpt's patched one) with a float weight, no bias
    and no hooks. A subclass with its own forward (bitsandbytes' Linear8bitLt holds int8 in
    .weight) or a hook that changes the output would be bypassed, giving another loss."""
    return (isinstance(head, torch.nn.Linear) and type(head).forward in (torch.nn.Linear.forward, linear_forward)
            and head.bias is None and head.weight.is_floating_point()
            and not head._forward_hooks and not head._forward_pre_hooks)


# kind -> (forward, extra class attributes) of the patched class, as fastpt.patch swaps them
# (for unpickling, which knows only the kind).
_KINDS = {"rms_norm": (rms_norm_forward, None), "swiglu": (swiglu_mlp_forward, None),
          "rope": (llama_attention_forward, None), "linear": (linear_forward, None),
          "loss": (None, CAUSAL_LM_LOSS), "cross_entropy": (causal_lm_forward, CAUSAL_LM_LOSS)}
