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
    Attention weights are never materialised, so the second output is None (as HF's sdpa).
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
    out = attention(query, key, value, causal=bool(causal) and query.shape[2] > 1, key_padding_mask=key_padding_mask,
                    attn_bias=bias, scale=scaling, dropout_p=float(dropout) if module.training else 0.0)
    return out.transpose(1, 2), None


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
        padding = attention_mask[:, :kv_length]
        if padding.shape[-1] < kv_length:  # mask shorter than the cache: the rest is visible
            padding = torch.nn.functional.pad(padding, (0, kv_length - padding.shape[-1]), value=True)
        return padding.to(torch.bool)
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
