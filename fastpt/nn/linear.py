"""``fastpt.nn.Linear``: ``torch.nn.Linear`` (same constructor, parameters and state-dict keys)
whose forward is ``fastpt.ops.linear``: fastpt's GEMM where it beats torch's BLAS (float32 on
non-Intel x86 CPUs with AVX-512; in inference from 1024 rows, oneDNN's float32 kernel there),
``F.linear`` everywhere else. ``use_fused = False`` (set by the models' ``use_fused`` switch)
runs ``F.linear`` always.

Inference under autocast (grad mode off) keeps the weight's copy in the autocast dtype across
calls instead of casting the weight on every call as autocast does: for a BERT-base forward
in bf16 that cast is ~9% of the time. The copy is the tensor autocast would make (same
rounding); it is remade when the weight changes (an optimizer step or load_state_dict bumps
its version counter, ``.to()`` gives new storage) and costs one extra copy of the weight in
that dtype (``del module._autocast_weight`` frees it).

With bf16 autocast on a CPU whose oneDNN runs bf16 natively, products of more than 4 rows
instead keep the weight packed in oneDNN's layout (``_packed_weight``, same bytes) and run one
prepacked oneDNN call (``fastpt.ops._onednn``): the reorder ``F.linear`` does per call is gone,
and ``forward_activation`` fuses a GELU / ReLU into the same call. Up to 4 rows (decoding)
stay on fastpt's matrix-vector product with the plain bf16 copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastpt.ops import _onednn
from fastpt.ops.gemm import _GEMV_ROWS, linear, onednn_inference

# Hugging Face ACT2FN names.
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "silu": F.silu}


# Input dtypes CPU autocast casts to bf16 for a linear (float64 and integers raise there).
_AUTOCAST_CASTS = (torch.float32, torch.bfloat16, torch.float16)

# Inference caches in a Linear's __dict__, made from the weight by ``Linear._cached``.
_CACHES = ("_autocast_weight", "_packed_weight")
# The models' decode copies (fastpt.models._decode_weights), on the model's __dict__.
_MODEL_CACHES = ("_decode_weights_cache",)


def clear_weight_caches(model: nn.Module) -> None:
    """Drop every weight copy fastpt keeps for inference in ``model`` (autocast and oneDNN
    copies of ``Linear`` weights, generation's decode copies); they are remade on next use.

    Each copy is remade by itself when its weight changes through torch: the weight's
    version counter (an optimizer step, ``load_state_dict``, an in-place op under
    ``torch.no_grad()``) or its storage (``.to()``). A write through ``param.data`` bypasses the
    version counter, as it bypasses autograd's checks: call this after one."""
    for module in model.modules():
        for name in _CACHES + _MODEL_CACHES:
            module.__dict__.pop(name, None)


class Linear(nn.Linear):
    use_fused = True

    def __getstate__(self):
        # copy.deepcopy and pickling leave the caches out: they are remade from the weight, and
        # oneDNN's packed tensor has no storage to copy.
        state = super().__getstate__()
        for name in _CACHES:
            state.pop(name, None)
        return state

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_activation(x, None)

    def forward_activation(self, x: Tensor, activation: str | None) -> Tensor:
        """``act(self(x))`` for a Hugging Face activation name (``ACTIVATIONS``) or None: one
        fused call where oneDNN's inference kernel runs (the packed bf16 path of the module
        docstring, or float32 from 1024 rows: ``fastpt.ops.gemm.onednn_inference``), else two
        steps."""
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if not self.use_fused:
            y = F.linear(x, self.weight, self.bias)
        elif activation in _onednn.POST_OPS and (wb := self._onednn_operands(x, activation)) is not None:
            return _onednn.linear(x, *wb, activation)
        else:
            y = linear(x, self._inference_weight(x), self.bias)
        return y if activation is None else ACTIVATIONS[activation](y)

    def _inference_weight(self, x: Tensor) -> Tensor:
        """The weight, or in inference under autocast its cached copy in the autocast dtype."""
        w = self.weight
        dtype = self._inference_dtype(x)
        if dtype is None:
            return w
        return self._cached("_autocast_weight", dtype, lambda: w.detach().to(dtype))

    def _onednn_operands(self, x: Tensor, activation: str | None) -> tuple[Tensor, Tensor | None] | None:
        """(weight, bias) for oneDNN's inference kernel (``fastpt.ops._onednn``) where it runs:
        packed in bf16 with a bf16 bias under bf16 autocast, the float32 ones themselves where
        ``linear`` would run oneDNN's float32 kernel; else None. (Without an activation to fuse,
        ``linear`` takes the float32 route itself: not asked twice.)"""
        if activation is not None and onednn_inference(x, self.weight, self.bias):
            return self.weight, self.bias
        return self._packed_operands(x)

    def _packed_operands(self, x: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """In inference under bf16 autocast, for more than ``_GEMV_ROWS`` rows where oneDNN runs
        bf16 natively: (the weight packed for oneDNN, the bias in bf16), cached; else None."""
        if self._inference_dtype(x) != torch.bfloat16 or x.device.type != "cpu" or not _onednn.bf16_available():
            return None
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= _GEMV_ROWS or x.dim() < 2 or x.shape[-1] != self.in_features or x.dtype not in _AUTOCAST_CASTS:
            return None  # few rows: fastpt's matrix-vector product; bad input: F.linear's errors
        bias = self.bias
        return self._cached("_packed_weight", torch.bfloat16, lambda: (
            _onednn.pack(self.weight, rows), None if bias is None else bias.detach().to(torch.bfloat16)))

    def _inference_dtype(self, x: Tensor) -> torch.dtype | None:
        """The autocast dtype when a cached copy of the weight applies (inference under autocast,
        float32 weight on x's device, not compiling), else None."""
        w, device = self.weight, x.device.type
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device) or torch.compiler.is_compiling():
            return None
        dtype = torch.get_autocast_dtype(device)
        if w.dtype == dtype or w.dtype != torch.float32 or w.device != x.device:
            return None
        return dtype

    def _cached(self, name: str, dtype: torch.dtype, make):
        """``make()``, kept in ``self.__dict__[name]`` until the weight or the bias changes
        (version counter or storage)."""
        w, b = self.weight, self.bias
        stamp = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version), dtype)
        hit = self.__dict__.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        self.__dict__.pop(name, None)  # free the stale copy before making the new one
        value = make()
        self.__dict__[name] = (stamp, value)
        return value
