"""A causal prefill with a prefix that keeps sdpa's fused kernels on CUDA.

Over ``[prefix; real]`` a causal prefill is causal aligned to the *bottom right*: query ``i``
sees the ``P`` prefix keys and the real keys ``0..i``, i.e. key ``j <= i + P``. torch
expresses exactly that as ``causal_lower_right(T, P + T)``, a ``CausalBias`` that sdpa hands
to the flash kernel (grouped-query attention without repeating keys) or the memory-efficient
kernel without materialising a mask, forward and backward. The explicit ``(T, P + T)`` mask the
concatenating splice builds instead rules out the flash kernel.

On CPU the bias would be materialised into that same mask, so the CPU keeps
:mod:`prefix_hooks.prefix.merged_attention` (inference) or the explicit mask (training); this
path is taken on CUDA only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "sliding_window")


def lower_right_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    kwargs: Mapping[str, Any],
    devices: tuple[str, ...] = ("cuda",),
) -> tuple[torch.Tensor, None] | None:
    """sdpa over ``[prefix; real]`` for a causal call without a mask (sdpa's ``is_causal`` prefill).

    Args:
        query: ``(B, H, T, D)``.
        key, value: ``(B, kv_heads, S, D)`` with ``S >= T``; the first ``T`` are the call's (a
            static cache's unused tail is cut, as sdpa's ``is_causal`` path does).
        prefix: ``(B, kv_heads, P, D)`` keys and values.
        kwargs: the attention call's keyword arguments (``scaling``, ``dropout``, ...).
        devices: device types this path serves (tests pass ``("cpu",)`` to check it there).

    Returns:
        ``(output (B, T, H, D), None)`` as transformers' sdpa function returns it, or ``None``
        when this path does not apply (another device, or arguments sdpa cannot take).
    """
    if query.device.type not in devices or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return None
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads = key.shape[1]
    if heads % kv_heads or key.dtype != query.dtype or value.dtype != query.dtype:
        return None
    prefix_key, prefix_value = (part.to(query.dtype) for part in prefix)  # (B, kv_heads, P, D) each
    key = torch.cat([prefix_key, key[:, :, :q_len]], dim=2)  # (B, kv_heads, P + T, D)
    value = torch.cat([prefix_value, value[:, :, :q_len]], dim=2)
    bias = causal_lower_right(q_len, key.shape[2])  # query i sees keys j <= i + P
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=float(kwargs.get("dropout") or 0.0),
        scale=kwargs.get("scaling"), enable_gqa=heads != kv_heads,
    )  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)
