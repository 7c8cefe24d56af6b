"""The weights generation decodes with: cast once (autocast), column-major (float32 on the
CPU), q/k/v and gate/up stacked; made once and cached on the model across calls."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from fastpt.nn.linear import Linear
from fastpt.ops.gemm import own_kernel_active


def _decode_copy(model, key, parts: list[Tensor], dtype: torch.dtype, col: bool) -> Tensor:
    """``parts`` stacked along dim 0 (one part: itself), in ``dtype``, column-major if
    ``col``; from the model's cache of such copies when no part has changed since (same
    storage, shape, strides and version counter: optimizer steps and load_state_dict bump
    the version)."""
    cache = model.__dict__.setdefault("_decode_weights_cache", {})
    stamp = tuple((p.data_ptr(), tuple(p.shape), p.stride(), p.dtype, p._version) for p in parts) + (dtype, col)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    cache.pop(key, None)  # free the stale copy before making the new one
    if len(parts) == 1:
        data = parts[0].data.to(dtype)
    else:
        data = torch.cat([p.data.to(dtype) for p in parts], 0)
    data = data.t().contiguous().t() if col else data
    cache[key] = (stamp, data)
    return data


def _stackable(linears) -> bool:
    """Plain nn.Linears (not LoRA-wrapped, no hooks or patched forward: stacking would skip
    them) of one dtype, device and input width, all with or all without bias."""
    if not all(type(m) in (nn.Linear, Linear) and not m._forward_hooks and not m._forward_pre_hooks
               and "forward" not in m.__dict__ for m in linears):
        return False  # before reading .weight: a LoRA or IA3 wrapper has none of its own
    ws = [m.weight for m in linears]
    return (len({(w.dtype, w.device, w.shape[1]) for w in ws}) == 1
            and len({m.bias is None for m in linears}) == 1)


def _stacks(model):
    """(module, attribute, linears) whose products generate computes as one: the q/k/v of
    each decoder layer's self-attention, the gate/up of its SwiGLU."""
    from fastpt.models.decoder import DecoderLayer
    from fastpt.models.common import Attention
    from fastpt.nn import SwiGLU
    for layer in model.modules():
        if not isinstance(layer, DecoderLayer):
            continue
        a = layer.attn
        if isinstance(a, Attention):  # not a fine-tuning wrapper (prefix tuning, adapters)
            yield a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]
        if isinstance(layer.mlp, SwiGLU):
            yield layer, "fused_gate_up", [layer.mlp.gate_proj, layer.mlp.up_proj]


@contextlib.contextmanager
def decode_weights(model, device_type: str, copies: bool = True):
    """Linear weights in the dtype, layout and grouping decoding wants, for the whole call;
    the originals are restored after. With ``copies`` (generations of 8 tokens or more) the
    copies are kept on the model (``_decode_weights_cache``: one extra copy of the linear
    weights, 133 MB for the fp32 6 x d512 Llama with its 32000-token head) and reused by the
    next call while the weights are unchanged, up to ``KEEP_ACROSS_CALLS_BYTES`` (larger
    copies are freed after each call); ``del model._decode_weights_cache`` frees them.

    Casts: under autocast every nn.Linear casts its float32 weight to the autocast dtype on
    every call, and decoding calls each linear once per token: a weight cast costs more
    memory traffic than the matrix-vector product itself. So they are cast once (the values
    autocast would use: results are unchanged). Weights shared with an embedding (tied
    heads) keep their dtype: the embedding keeps returning float32.

    Layout (CPU, float32 weights, where torch's BLAS does the products): each (out, in) weight
    is stored column-major (its transpose contiguous; same shape and values), so ``x @ W.T``
    reads W.T as a contiguous (in, out) matrix. Where fastpt's GEMM is active
    (``fastpt.ops.gemm``) the weights stay row-major: its matrix-vector product streams them
    as they are, at ~53 GB/s against MKL's ~31 GB/s column-major.

    Grouping: a decoder layer's q/k/v projections are one stacked weight (``fused_qkv``), as
    are its SwiGLU's gate/up (``fused_gate_up``): two matrix-vector products per layer and
    token instead of five (same values: each output is the same dot product)."""
    # NOTE: streaming the 43 linears of the 6 x d512 Llama plus its 32000 x 512 head once
    # per token (more than L3 holds), 2 threads, fp32: 8.4 ms row-major vs 5.6 ms
    # column-major (the head alone 4.1 vs 2.2 ms). bf16 (oneDNN) is faster row-major
    # (1 thread: 5.0 vs 6.6 ms), so bf16 weights keep their layout. Making the copies
    # costs 40-90 ms for those 133 MB (page faults of fresh memory included), about ten
    # tokens' worth: hence the cache across calls.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def target(p: Tensor, weight: bool) -> tuple[torch.dtype, bool]:
        cast = dtype is not None and p.dtype == torch.float32 and id(p) not in tied
        new_dtype = dtype if cast else p.dtype
        col = (copies and device_type == "cpu" and weight and new_dtype == torch.float32 and p.is_contiguous()
               and not own_kernel_active())  # fastpt's matrix-vector product reads W row-major
        return new_dtype, col

    saved, keep, stacked, covered = {}, set(), [], set()  # covered: used only stacked
    if copies:
        for module, attr, linears in _stacks(model):
            if not _stackable(linears):
                continue
            w = linears[0].weight
            new_dtype, col = target(w, True)
            weight = _decode_copy(model, (attr, id(module), "w"), [m.weight for m in linears], new_dtype, col)
            bias = None
            if linears[0].bias is not None:
                bias = _decode_copy(model, (attr, id(module), "b"), [m.bias for m in linears],
                                    target(linears[0].bias, False)[0], False)
            keep.update({(attr, id(module), "w"), (attr, id(module), "b")})
            covered.update(id(p) for m in linears for p in (m.weight, m.bias))
            setattr(module, attr, (weight, bias))
            stacked.append((module, attr))
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            continue
        for p in (m.weight, m.bias):
            if p is None or id(p) in saved or id(p) in covered:
                continue
            keep.add(id(p))
            new_dtype, col = target(p, p is m.weight)
            if new_dtype != p.dtype or col:
                saved[id(p)] = (p, p.data)
                p.data = _decode_copy(model, id(p), [p], new_dtype, col)
    cache = model.__dict__.get("_decode_weights_cache", {})
    for gone in cache.keys() - keep:  # parameters or layers no longer in the model
        del cache[gone]
    try:
        yield
    finally:
        for module, attr in stacked:
            setattr(module, attr, None)
        for p, data in saved.values():
            p.data = data
        if _cache_bytes(model) > KEEP_ACROSS_CALLS_BYTES:
            del model._decode_weights_cache  # a large model: not worth a second copy of its weights


KEEP_ACROSS_CALLS_BYTES = 512 * 2**20
"""Copies up to this size stay on the model between generate calls; larger ones are freed
at the end of each call. Making them costs about ten tokens' worth of decoding, which
matters for the small models fastpt decodes on a CPU, while a second copy of a large
model's weights would not be welcome."""


def _cache_bytes(model) -> int:
    cache = model.__dict__.get("_decode_weights_cache", {})
    return sum(t.numel() * t.element_size() for _, t in cache.values())
