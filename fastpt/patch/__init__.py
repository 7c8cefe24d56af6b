"""Patch Hugging Face ``transformers`` models in place to run on fastpt's kernels.

    report = fastpt.patch(model)   # Llama / Mistral / Qwen2, GPT-2, BERT, T5; peft-wrapped too
    print(report)                  # what runs on fastpt now, what stayed and why
    fastpt.unpatch(model)          # back to the original modules

What is swapped (module classes are swapped for fastpt subclasses, so parameters, state-dict keys
and peft wrappers are untouched):

- RMSNorm (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, T5LayerNorm) -> ``fastpt.ops.rms_norm``;
- the gated MLP's ``silu(gate) * up`` (LlamaMLP, MistralMLP, Qwen2MLP) -> ``fastpt.ops.swiglu``;
- the rotary embedding applied in LlamaAttention / MistralAttention / Qwen2Attention -> ``fastpt.ops.rope``;
- attention: "fastpt" is registered in transformers' ``AttentionInterface`` and set as the
  model config's attention implementation, so HF's own modules call ``fastpt.ops.attention``
  (GQA without copying k/v, T5's position bias as ``attn_bias``, padding as a key mask);
- the causal-LM loss (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
  GPT2LMHeadModel: their ``loss_function``) -> ``fastpt.ops.cross_entropy``: the same loss and gradient, the logits
  still returned, in one kernel pass instead of a float32 copy, log-softmax and its backward;
  ``fused_cross_entropy=True`` goes further (below);
- ``nn.Linear`` layers -> ``fastpt.ops.linear``, only where fastpt's GEMM is faster than
  torch's BLAS (float32 on non-Intel x86 CPUs with AVX-512: ``fastpt.ops.gemm``); elsewhere
  they are left alone and not counted.

LayerNorm (GPT-2, BERT) and GELU/ReLU MLPs have no fastpt kernel and are reported as kept.
A model type outside the list, or a module the patcher does not know in a known model, raises
:class:`PatchError` naming what would and would not be patched, and changes nothing (pass
``strict=False`` to patch what is known and get the rest listed in the report).
"""

from __future__ import annotations

import re
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from fastpt.ops.gemm import own_kernel_active
from fastpt.patch import modules as _m

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "bert", "t5")
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "T5LayerNorm"}
_SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
_ROPE_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
_CAUSAL_LMS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
# Causal LMs whose loss_function fastpt takes over, without the fused-loss forward.
_LOSS_ONLY_LMS = {"GPT2LMHeadModel"}
_INTERFACE_ATTENTIONS = _ROPE_ATTENTIONS | {"GPT2Attention", "BertSelfAttention", "BertCrossAttention",
                                            "T5Attention"}
# Modules of the supported families that fastpt leaves alone, and why.
_KEPT = {"GPT2MLP": "GELU MLP (no fused GELU kernel)", "BertIntermediate": "GELU MLP (no fused GELU kernel)",
         "T5DenseActDense": "ReLU/GELU MLP (no fused kernel)",
         "T5DenseGatedActDense": "gated SiLU MLP (fastpt's SwiGLU is patched into Llama/Mistral/Qwen2 MLPs only)",
         "LayerNorm": "LayerNorm has a mean and a bias (fastpt has RMSNorm only)"}
_CONTAINERS = {"BertAttention", "T5LayerSelfAttention", "T5LayerCrossAttention", "T5LayerFF"}
_CANDIDATE = re.compile(r"(RMSNorm|LayerNorm|Norm|Attention|MLP|Intermediate)$")
_SILU = ("silu", "swish")


class PatchError(ValueError):
    """The model has parts fastpt does not know how to patch; ``report`` lists them."""

    def __init__(self, message: str, report: "PatchReport"):
        super().__init__(message)
        self.report = report


@dataclass
class PatchReport:
    """``patched``: kind -> number of modules now on fastpt (rms_norm, swiglu, rope, attention,
    linear, loss or cross_entropy).
    ``kept``: HF class name -> why it stays on HF's code. ``unknown``: module classes fastpt
    does not recognise (only with ``strict=False`` after a patch)."""

    model_type: str | None
    patched: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastpt.patch ({self.model_type}): "
                 + (", ".join(f"{n} {k}" for k, n in sorted(self.patched.items())) or "nothing patched")]
        lines += [f"  kept {name}: {why}" for name, why in sorted(self.kept.items())]
        if self.unknown:
            lines.append("  not patched, unknown to fastpt: " + ", ".join(sorted(self.unknown)))
        return "\n".join(lines)


def _is_hf(module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _class_name(module) -> str:
    cls = type(module)
    return cls._fastpt_original.__name__ if _m.is_patched(module) else cls.__name__


def _model_type(model) -> str | None:
    for module in model.modules():
        mt = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(mt, str) and mt:
            return mt
    return None


def _configs(model) -> list:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            out.append(config)
    return out


def _plan(model, fused_cross_entropy: bool = False) -> tuple[list[tuple[nn.Module, str, object]], PatchReport]:
    """(module, kind, forward) swaps to make, and the report of the patched model."""
    report = PatchReport(_model_type(model))
    swaps, counts = [], Counter()
    own_gemm = own_kernel_active()
    for module in model.modules():
        name = _class_name(module)
        if type(module) is nn.Linear or type(module).__dict__.get("_fastpt_kind") == "linear":
            if own_gemm:  # elsewhere fastpt.ops.linear would be F.linear: nothing to swap
                swaps.append((module, "linear", _m.linear_forward))
                counts["linear"] += 1
            continue
        if not (_is_hf(module) or _m.is_patched(module)):
            if isinstance(module, nn.LayerNorm):
                report.kept["LayerNorm"] = _KEPT["LayerNorm"]
            continue
        if name in _CAUSAL_LMS:
            if fused_cross_entropy or type(module).__dict__.get("_fastpt_kind") == "cross_entropy":
                swaps.append((module, "cross_entropy", _m.causal_lm_forward))
                counts["cross_entropy"] += 1
            else:
                swaps.append((module, "loss", None))
                counts["loss"] += 1
        elif name in _LOSS_ONLY_LMS:
            swaps.append((module, "loss", None))
            counts["loss"] += 1
        elif name in _RMS_NORMS:
            swaps.append((module, "rms_norm", _m.rms_norm_forward))
            counts["rms_norm"] += 1
        elif name in _SWIGLU_MLPS:
            act = getattr(getattr(module, "config", None), "hidden_act", None)
            if act in _SILU:
                swaps.append((module, "swiglu", _m.swiglu_mlp_forward))
                counts["swiglu"] += 1
            else:
                report.kept[name] = f"activation {act!r} (fastpt's SwiGLU kernel is silu only)"
        elif name == "T5DenseGatedActDense":
            act = type(getattr(module, "act", None)).__name__  # SiLU(Activation), NewGELUActivation, ...
            report.kept[name] = (_KEPT[name] if "SiLU" in act
                                 else f"gated MLP with {act} (fastpt's SwiGLU kernel is silu only)")
        elif name in _KEPT:
            report.kept[name] = _KEPT[name]
        elif _CANDIDATE.search(name) and name not in _INTERFACE_ATTENTIONS and name not in _CONTAINERS:
            report.unknown.append(name)
        if name in _ROPE_ATTENTIONS:
            swaps.append((module, "rope", _m.llama_attention_forward))
            counts["rope"] += 1
        if name in _INTERFACE_ATTENTIONS:
            counts["attention"] += 1
    report.patched = dict(counts)
    report.unknown = sorted(set(report.unknown))
    return swaps, report


def patch(model: nn.Module, *, strict: bool = True, fused_cross_entropy: bool = False) -> PatchReport:
    """Swap fastpt kernels into a ``transformers`` model in place; returns a :class:`PatchReport`.

    Idempotent (patching twice changes nothing more). Works on peft-wrapped models
    (``get_peft_model``); patch before ``torch.compile``.

    Without it the causal LMs keep HF's forward and return their logits; only the loss
    function is fastpt's (report kind ``loss``).

    ``fused_cross_entropy``: Llama/Mistral/Qwen2 ``*ForCausalLM`` called in training mode with
    ``labels`` compute the loss from the hidden states in chunks (fastpt.models.loss) and
    return ``logits=None``: the (B, T, V) logits and their gradient are never materialised.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        PatchError: with ``strict`` (the default), the model type is not one of
            SUPPORTED_MODEL_TYPES or holds modules fastpt does not recognise; nothing is changed.
            With ``strict=False`` the known parts are patched, the rest listed and warned about.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpt.patch expects a torch.nn.Module, got {type(model).__name__}")
    from fastpt.patch.attention import NAME, register

    swaps, report = _plan(model, fused_cross_entropy)
    problems = []
    if report.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model type {report.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    if report.unknown:
        problems.append("modules unknown to fastpt: " + ", ".join(report.unknown))
    if problems:
        message = "; ".join(problems) + f". Would patch: {report.patched or 'nothing'}"
        if strict:
            raise PatchError(message + ". Nothing was changed (strict=False patches the known parts).", report)
        warnings.warn("fastpt.patch: partial patch: " + message, stacklevel=2)
    for module, kind, forward in swaps:
        if _m.is_patched(module) and type(module)._fastpt_kind != kind:  # loss -> fused loss
            _m.restore(module)
        if not _m.is_patched(module):
            _m.swap(module, kind, forward, _m.CAUSAL_LM_LOSS if kind in ("loss", "cross_entropy") else None)
    if report.patched.get("attention"):
        register()
        restore = next((m.__dict__["_fastpt_attn_restore"] for m in _attn_holders(model)
                        if "_fastpt_attn_restore" in m.__dict__), None)
        if restore is None:
            restore = [(c, c._attn_implementation) for c in _configs(model) if c._attn_implementation != NAME]
        # On the wrapper and on every HF model inside it (a peft model's base model), so that
        # unpatching any of them restores the attention implementation.
        for holder in _attn_holders(model):
            object.__setattr__(holder, "_fastpt_attn_restore", restore)
        for config in _configs(model):
            config._attn_implementation = NAME
    return report


def _attn_holders(model: nn.Module) -> list[nn.Module]:
    # the model passed to patch() and the transformers models (PreTrainedModel) within it
    return [model] + [m for m in model.modules() if m is not model and _is_hf(m)
                      and callable(getattr(m, "save_pretrained", None)) and hasattr(m, "config")]


def unpatch(model: nn.Module) -> int:
    """Restore every module :func:`patch` swapped and the attention implementations it replaced.

    Returns the number of modules restored (0 when the model was not patched).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpt.unpatch expects a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        if _m.is_patched(module):
            _m.restore(module)
            restored += 1
        restore = module.__dict__.pop("_fastpt_attn_restore", None)
        for config, previous in restore or ():
            config._attn_implementation = previous
    return restored


__all__ = ["PatchError", "PatchReport", "SUPPORTED_MODEL_TYPES", "patch", "unpatch"]


class _CallableModule(types.ModuleType):
    # `fastpt.patch(model)` calls patch() while `fastpt.patch.PatchReport` and
    # `import fastpt.patch` keep working: binding the function over the package's name in
    # fastpt/__init__ would break the latter.
    def __call__(self, model: nn.Module, *, strict: bool = True, fused_cross_entropy: bool = False) -> PatchReport:
        return patch(model, strict=strict, fused_cross_entropy=fused_cross_entropy)


sys.modules[__name__].__class__ = _CallableModule
