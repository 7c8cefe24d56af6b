"""Patch Hugging Face ``transformers`` models in place to run on fastpt's kernels.

    report = fastpt.patch(model)   # Llama / Mistral / Qwen2, GPT-2, BERT, T5; peft-wrapped too
    print(report)                  # what runs on fastpt now, what stayed and why
    fastpt.unpatch(model)          # back to the original modules
    fastpt.patch.patch_llama(model)  # the same, refusing a model of another family
                                     # (also patch_gpt2, patch_bert, patch_t5)

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
A user's subclass of one of these transformers classes is patched as its base when it keeps
the base's forward. A model type outside the list, or in a known model a module the patcher
would leave alone (a class it does not know, a subclass with its own forward, remote code,
a torch.nn.RMSNorm), raises :class:`PatchError` naming what would and would not be patched,
and changes nothing (pass ``strict=False`` to patch what is known and get the rest listed in
the report's ``not_patched``). The attention implementation is set on the configs of the
supported model types only.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from fastpt.ops.gemm import own_kernel_active
from fastpt.patch import modules as _m

# Per-family helper -> the model types it patches (Llama-family: the Llama-like types).
_FAMILIES = {"patch_llama": ("llama", "mistral", "qwen2"), "patch_gpt2": ("gpt2",), "patch_bert": ("bert",),
             "patch_t5": ("t5",)}
SUPPORTED_MODEL_TYPES = tuple(t for family in _FAMILIES.values() for t in family)
_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "T5LayerNorm"}
_SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
_ROPE_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
_CAUSAL_LMS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
# Causal LMs whose loss_function fastpt takes over, without the fused-loss forward.
_LOSS_ONLY_LMS = {"GPT2LMHeadModel"}
_LMS = _CAUSAL_LMS | _LOSS_ONLY_LMS
_INTERFACE_ATTENTIONS = _ROPE_ATTENTIONS | {"GPT2Attention", "BertSelfAttention", "BertCrossAttention",
                                            "T5Attention"}
# Modules of the supported families that fastpt leaves alone, and why.
_KEPT = {"GPT2MLP": "GELU MLP (no fused GELU kernel)", "BertIntermediate": "GELU MLP (no fused GELU kernel)",
         "T5DenseActDense": "ReLU/GELU MLP (no fused kernel)",
         "T5DenseGatedActDense": "gated SiLU MLP (fastpt's SwiGLU is patched into Llama/Mistral/Qwen2 MLPs only)",
         "LayerNorm": "LayerNorm has a mean and a bias (fastpt has RMSNorm only)"}
_CONTAINERS = {"BertAttention", "T5LayerSelfAttention", "T5LayerCrossAttention", "T5LayerFF"}
_CANDIDATE = re.compile(r"(RMSNorm|LayerNorm|Norm|Attention|MLP|Intermediate)$")


class PatchError(ValueError):
    """The model has parts fastpt does not know how to patch; ``report`` lists them."""

    def __init__(self, message: str, report: "PatchReport"):
        super().__init__(message)
        self.report = report


@dataclass
class PatchReport:
    """``patched``: kind -> number of modules now on fastpt (rms_norm, swiglu, rope, attention,
    linear, loss or cross_entropy).
    ``kept``: class name -> why it stays on its own code by design (no fastpt kernel for it).
    ``not_patched``: class name -> why fastpt left it alone although it looks like a part fastpt
    replaces (a class fastpt does not know, a subclass with its own forward, remote code,
    torch.nn.RMSNorm); patch() raises on these unless ``strict=False``."""

    model_type: str | None
    patched: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    not_patched: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastpt.patch ({self.model_type}): "
                 + (", ".join(f"{n} {k}" for k, n in sorted(self.patched.items())) or "nothing patched")]
        lines += [f"  kept {name}: {why}" for name, why in sorted(self.kept.items())]
        lines += [f"  not patched {name}: {why}" for name, why in sorted(self.not_patched.items())]
        return "\n".join(lines)


def _original_class(module) -> type:
    cls = type(module)
    return cls.__dict__.get("_fastpt_original", cls)


def _hf_base(cls: type) -> type | None:
    """The first transformers class in ``cls``'s MRO: itself for HF's classes, the HF class a
    user's subclass derives from, None for anything else (torch, remote code, the user's)."""
    return next((c for c in cls.__mro__ if c.__module__.startswith("transformers.")), None)


def _own(cls: type, base: type, *attrs: str) -> list[str]:
    # The attributes a subclass redefines: fastpt's replacement of the base's would drop them.
    return [a for a in attrs if getattr(cls, a, None) is not getattr(base, a, None)]


def _model_types(model) -> list[str]:
    found = []
    for module in model.modules():
        mt = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(mt, str) and mt and mt not in found:
            found.append(mt)
    return found


def _configs(model) -> list:
    """The configs of the supported model types, whose attention implementation patch() sets
    (another model's config is left alone, so its attention stays its own)."""
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if (config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen
                and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES):
            seen.add(id(config))
            out.append(config)
    return out


def _interface_attention(module) -> str | None:
    """Why ``module``, an attention class that goes through transformers' attention interface,
    would not run fastpt's attention once its config names "fastpt"; None when it would."""
    cls = _original_class(module)
    base = _hf_base(cls)
    if _own(cls, base, "forward"):
        return (f"subclass of {base.__name__} with its own forward (its attention runs fastpt's only if "
                "that forward calls transformers' attention interface)")
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"attention of model type {model_type!r}, which fastpt does not patch"
    return None


def _foreign(module, cls: type, report: PatchReport) -> None:
    """A module with no transformers class in its MRO: kept, reported, or nothing to do."""
    if cls.__module__.split(".")[0] == "fastpt":
        return  # fastpt's own modules (fastpt.nn.RMSNorm, ...) run its kernels already
    if isinstance(module, nn.LayerNorm):
        report.kept["LayerNorm"] = _KEPT["LayerNorm"]
    elif isinstance(module, nn.RMSNorm):
        report.not_patched[cls.__name__] = ("torch.nn.RMSNorm: fastpt patches transformers' RMSNorm classes "
                                            "only (fastpt.nn.RMSNorm.from_module(m) converts it)")
    elif _CANDIDATE.search(cls.__name__):
        where = "remote code (trust_remote_code)" if cls.__module__.startswith("transformers_modules") \
            else "not a transformers class"
        report.not_patched[cls.__name__] = (f"{where}, {cls.__module__}.{cls.__qualname__}: fastpt patches "
                                            "transformers' own classes (and subclasses that keep their forward)")


def _is_silu(act) -> bool:
    # transformers' ACT2FN gives SiLUActivation for "silu", nn.SiLU for "swish"
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _plan(model, fused_cross_entropy: bool = False) -> tuple[list[tuple[nn.Module, str, object]], PatchReport,
                                                              list[str]]:
    """(module, kind, forward) swaps to make, the report of the patched model and the problems
    with its model types (unsupported or none). A user's subclass of a known transformers class is patched as its base when it keeps the
    base's forward (fastpt's forward is the base's with the kernels in); one with its own
    forward is reported in ``not_patched``."""
    model_types = _model_types(model)
    report = PatchReport(model_types[0] if model_types else None)
    swaps, counts = [], Counter()
    own_gemm = own_kernel_active()

    def swap(module, kind, forward):
        swaps.append((module, kind, forward))
        counts[kind] += 1

    for module in model.modules():
        cls = _original_class(module)
        if cls is nn.Linear:
            if own_gemm:  # elsewhere fastpt.ops.linear would be F.linear: nothing to swap
                swap(module, "linear", _m.linear_forward)
            continue
        base = _hf_base(cls)
        if base is None:
            _foreign(module, cls, report)
            continue
        name, label = base.__name__, cls.__name__
        of = "" if cls is base else f"subclass of {name} "
        if name in _LMS:
            fused = name in _CAUSAL_LMS and (fused_cross_entropy or type(module).__dict__.get("_fastpt_kind")
                                              == "cross_entropy")
            own = _own(cls, base, "forward", "loss_function") if fused else _own(cls, base, "loss_function")
            if not own and fused:
                swap(module, "cross_entropy", _m.causal_lm_forward)
            elif not own:
                swap(module, "loss", None)
            elif own == ["forward"]:
                swap(module, "loss", None)
                report.not_patched[label] = f"{of}with its own forward: fused_cross_entropy not applied " \
                                            "(its loss_function is fastpt's)"
            else:
                report.not_patched[label] = f"{of}with its own loss_function: the loss stays its own"
        elif (name in _RMS_NORMS or name in _SWIGLU_MLPS) and _own(cls, base, "forward"):
            report.not_patched[label] = f"{of}with its own forward"
        elif name in _RMS_NORMS:
            eps = getattr(module, "variance_epsilon", None)
            if isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0:
                swap(module, "rms_norm", _m.rms_norm_forward)
            else:  # eps 0 (or an odd value): the kernel requires a positive eps
                report.kept[label] = f"eps {eps!r} (fastpt's RMSNorm kernel needs eps > 0)"
        elif name in _SWIGLU_MLPS:
            act = getattr(module, "act_fn", None)
            if _is_silu(act):
                swap(module, "swiglu", _m.swiglu_mlp_forward)
            else:
                report.kept[label] = f"activation {type(act).__name__} (fastpt's SwiGLU kernel is silu only)"
        elif name == "T5DenseGatedActDense":
            act = type(getattr(module, "act", None)).__name__  # SiLU(Activation), NewGELUActivation, ...
            report.kept[label] = (_KEPT[name] if "SiLU" in act
                                  else f"gated MLP with {act} (fastpt's SwiGLU kernel is silu only)")
        elif name in _KEPT:
            report.kept[label] = _KEPT[name]
        elif name in _INTERFACE_ATTENTIONS:
            why = _interface_attention(module)
            if why:
                report.not_patched[label] = why
            else:
                if name in _ROPE_ATTENTIONS:
                    swap(module, "rope", _m.llama_attention_forward)
                counts["attention"] += 1
        elif _CANDIDATE.search(name) and name not in _CONTAINERS:
            report.not_patched[label] = f"{of}unknown to fastpt".strip()
    report.patched = dict(counts)
    problems = [f"model type {t!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
                for t in (model_types or [None]) if t not in SUPPORTED_MODEL_TYPES]
    return swaps, report, problems


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
        PatchError: with ``strict`` (the default), a model type in the model is not one of
            SUPPORTED_MODEL_TYPES or a module would be left out (``report.not_patched``);
            nothing is changed.
            With ``strict=False`` the known parts are patched, the rest listed and warned about.
    """
    return _patch(model, strict, fused_cross_entropy, stacklevel=3)


def _patch(model: nn.Module, strict: bool, fused_cross_entropy: bool, stacklevel: int) -> PatchReport:
    # stacklevel: the partial-patch warning points at the user's call (via patch or a helper)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpt.patch expects a torch.nn.Module, got {type(model).__name__}")
    from fastpt.patch.attention import NAME, register

    swaps, report, problems = _plan(model, fused_cross_entropy)
    if report.not_patched:
        problems.append("not patched: " + "; ".join(f"{k} ({v})" for k, v in sorted(report.not_patched.items())))
    if problems:
        message = "; ".join(problems) + f". Would patch: {report.patched or 'nothing'}"
        if strict:
            raise PatchError(message + ". Nothing was changed (strict=False patches the known parts).", report)
        warnings.warn("fastpt.patch: partial patch: " + message, stacklevel=stacklevel)
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
    return [model] + [m for m in model.modules() if m is not model and _hf_base(_original_class(m))
                      and callable(getattr(m, "save_pretrained", None)) and hasattr(m, "config")]


def unpatch(model: nn.Module) -> int:
    """Restore every module :func:`patch` swapped and the attention implementations it replaced.

    Returns the number of patches undone, counted as :func:`patch`'s report counts them (the
    sum of its ``patched`` values): each module whose class was swapped, plus each attention
    module that ran fastpt's attention; 0 when the model was not patched.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpt.unpatch expects a torch.nn.Module, got {type(model).__name__}")
    restored, configs = 0, set()
    for module in model.modules():
        if _m.is_patched(module):
            _m.restore(module)
            restored += 1
        restore = module.__dict__.pop("_fastpt_attn_restore", None)
        for config, previous in restore or ():
            config._attn_implementation = previous
            configs.add(id(config))
    return restored + sum(_runs_fastpt_attention(m) and id(m.config) in configs for m in model.modules())


def _runs_fastpt_attention(module) -> bool:
    base = _hf_base(_original_class(module))
    return base is not None and base.__name__ in _INTERFACE_ATTENTIONS and _interface_attention(module) is None


def _patch_family(helper: str, model: nn.Module, strict: bool, fused_cross_entropy: bool = False) -> PatchReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpt.patch.{helper} expects a torch.nn.Module, got {type(model).__name__}")
    family, model_types = _FAMILIES[helper], _model_types(model)
    others = [t for t in model_types if t not in family]
    if others or not model_types:
        found = ", ".join(map(repr, model_types)) if model_types else "no transformers config in it"
        use = sorted({h for h, ts in _FAMILIES.items() for t in others if t in ts})
        hint = (f"use {' / '.join('fastpt.patch.' + h for h in use)} or fastpt.patch(model)" if use
                else f"fastpt patches {', '.join(SUPPORTED_MODEL_TYPES)} only" if others
                else "not a transformers model")
        raise PatchError(f"fastpt.patch.{helper} patches model types {', '.join(family)}; the model has "
                         f"{found}: {hint}. Nothing was changed.", _plan(model)[1])
    return _patch(model, strict, fused_cross_entropy, stacklevel=4)


def patch_llama(model: nn.Module, *, strict: bool = True, fused_cross_entropy: bool = False) -> PatchReport:
    """:func:`patch` for a Llama-family model (model type llama, mistral or qwen2), peft-wrapped
    or not; the same report.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        PatchError: the model holds another model type (the message names it and the helper
            for it), or as :func:`patch`."""
    return _patch_family("patch_llama", model, strict, fused_cross_entropy)


def patch_gpt2(model: nn.Module, *, strict: bool = True) -> PatchReport:
    """:func:`patch` for a GPT-2 model (model type gpt2); raises as :func:`patch_llama`."""
    return _patch_family("patch_gpt2", model, strict)


def patch_bert(model: nn.Module, *, strict: bool = True) -> PatchReport:
    """:func:`patch` for a BERT model (model type bert); raises as :func:`patch_llama`."""
    return _patch_family("patch_bert", model, strict)


def patch_t5(model: nn.Module, *, strict: bool = True) -> PatchReport:
    """:func:`patch` for a T5 model (model type t5); raises as :func:`patch_llama`."""
    return _patch_family("patch_t5", model, strict)


__all__ = ["PatchError", "PatchReport", "SUPPORTED_MODEL_TYPES", "patch", "patch_bert", "patch_gpt2", "patch_llama",
           "patch_t5", "unpatch"]


class _CallableModule(types.ModuleType):
    # `fastpt.patch(model)` calls patch() while `fastpt.patch.PatchReport` and
    # `import fastpt.patch` keep working: binding the function over the package's name in
    # fastpt/__init__ would break the latter.
    def __call__(self, model: nn.Module, *, strict: bool = True, fused_cross_entropy: bool = False) -> PatchReport:
        return _patch(model, strict, fused_cross_entropy, stacklevel=3)


sys.modules[__name__].__class__ = _CallableModule
