"""fastpt attention behind Hugging Face's ``AttentionInterface``.

``transformers`` models dispatch attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and build their masks through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the same key. Registering
"fastpt" in both lets HF's own modules call :func:`fastpt.ops.attention`:

- the mask function keeps the common cases structured instead of materialising a (B, 1, T, S)
  mask: a plain causal or bidirectional mask becomes the (B, S) key padding mask (or None), and
  the module's ``is_causal`` supplies the causal part, as HF's sdpa path does;
- any other mask (sliding window, packed sequences, chunked, a user's 4-D mask, a static cache)
  is materialised by HF's ``sdpa_mask`` as a (B, 1, T, S) bool mask, which the attention function
  turns into an additive bias (``-inf`` where masked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpt.ops.attention import attention

NAME = "fastpt"


def fastpt_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                             position_bias: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """HF attention-interface signature: q (B, H, T, D), k/v (B, Hkv, S, D) -> ((B, T, H, D), None).

    ``attention_mask``: None, a (B, S) key padding mask from :func:`fastpt_mask`, or a 4-D
    bool (True = attend) / additive float mask. ``position_bias`` (T5) is added to the logits.
    The second output is None (the weights are never materialised), except where the caller
    asked for them (``output_attentions=True``): then this call runs the eager formula and
    returns its (B, H, T, S) probabilities, as HF's eager attention does.
    """
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Biases stay in float32 under bf16/fp16 (as HF adds them to float32 scores): T5's learned
    # position bias gets its gradient in float32 then, within 2x of eager's bf16 error.
    bias_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    key_padding_mask, bias = None, position_bias
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_padding_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
        elif attention_mask.dim() == 4:
            causal = False  # a materialised mask already holds the causal part
            if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
                raise TypeError(f"a 4-D attention_mask must be bool (True = attend) or an additive float "
                                f"mask, got {attention_mask.dtype}")
            if attention_mask.dtype == torch.bool:
                mask_bias = torch.zeros(attention_mask.shape, dtype=bias_dtype, device=query.device)
                mask_bias = mask_bias.masked_fill(~attention_mask, float("-inf"))
            else:
                mask_bias = attention_mask.to(bias_dtype)
            bias = mask_bias if bias is None else bias.to(bias_dtype) + mask_bias
        else:
            raise ValueError(f"attention_mask must be (B, S) or 4-D, got shape {tuple(attention_mask.shape)}")
    if bias is not None:
        bias = bias.to(bias_dtype)
    if _weights_requested():
        return _eager_with_weights(module, query, key, value, bool(causal) and query.shape[2] > 1,
                                   key_padding_mask, bias, scaling, float(dropout) if module.training else 0.0)
    out = attention(query, key, value, causal=bool(causal) and query.shape[2] > 1, key_padding_mask=key_padding_mask,
                    attn_bias=bias, scale=scaling, dropout_p=float(dropout) if module.training else 0.0)
    return out.transpose(1, 2), None


def _weights_requested() -> bool:
    """Whether the running HF forward collects attention weights (``output_attentions``): its
    output-capturing context then holds an "attentions" (or "cross_attentions") list."""
    try:
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except (ImportError, LookupError):
        return False
    return bool(collected) and any(name.endswith("attentions") for name in collected)


def _eager_with_weights(module, query, key, value, causal, key_padding_mask, bias, scaling, dropout):
    """The reference formula (GQA, bottom-right causal, padding, bias; rows without keys give 0)
    returning the probabilities too, with dropout applied to them as HF's eager attention does."""
    H, Hkv, T, S = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
    if H != Hkv:
        key, value = key.repeat_interleave(H // Hkv, 1), value.repeat_interleave(H // Hkv, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (query @ key.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias  # float32 (float64) bias: the softmax below runs in that type
    visible = torch.ones(T, S, dtype=torch.bool, device=query.device)
    if causal:
        visible = visible.tril(S - T)
    visible = visible.expand(query.shape[0], 1, T, S)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    empty = ~visible.any(-1, keepdim=True)
    logits = logits.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    probs = logits.softmax(-1, dtype=softmax_dtype).masked_fill(empty, 0.0).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    return (probs @ value).transpose(1, 2), probs


def fastpt_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function=None, attention_mask: Tensor | None = None, local_size: int | None = None,
                **kwargs) -> Tensor | None:
    """HF mask-interface signature. Returns None, a (B, S) bool key padding mask, or HF's
    (B, 1, T, S) bool mask when the pattern is more than causal/bidirectional + padding."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    plain_bidirectional = mask_function is bidirectional_mask_function
    # fastpt's causal mask is aligned bottom-right (query i sees keys j <= i + S - T): the same
    # as HF's whenever the queries are the last T of the S positions.
    plain_causal = (mask_function is causal_mask_function and isinstance(q_offset, int) and kv_offset == 0
                    and q_offset + q_length == kv_length)
    if local_size is None and (plain_bidirectional or plain_causal):
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] >= kv_length:
            return attention_mask[:, :kv_length].to(torch.bool)
        # A mask shorter than the cache + new tokens: HF pads it with False (masked), which sdpa_mask
        # below reproduces exactly.
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def register() -> None:
    """Register "fastpt" in transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastpt_attention_forward)
    AttentionMaskInterface.register(NAME, fastpt_mask)
