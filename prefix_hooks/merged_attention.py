"""sdpa with a prefix, without copying the cache or losing the fused causal kernel.

Splicing a prefix by concatenation copies the layer's whole cached keys and values on
every decode step (O(context) per step), and in a prefill it forces sdpa off its fused
``is_causal`` kernel onto an explicit mask. Attention over ``[prefix; real]`` splits
exactly into two attentions merged by their log-sum-exps:

    out = sigmoid(lse_r - lse_p) * out_r + sigmoid(lse_p - lse_r) * out_p

where ``out_r, lse_r`` attend over the real keys with the model's own mask (through a
fused kernel that reports its log-sum-exp) and ``out_p, lse_p`` over the ``P`` prefix
keys, which every query sees. The extra cost of a decode step is independent of the
context length.

The path is taken only where it is exactly the sdpa computation: the sdpa backend on
CPU, no gradient, no dropout, no soft-capping, sinks or position bias, and a mask
shared by all heads. Everything else (training included) concatenates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prefix_hooks.splice import wants_causal

_DISQUALIFYING_KWARGS = ("softcap", "s_aux", "position_bias")


# CPU fused attention that also returns the log-sum-exp; absent in other torch builds
_FUSED_ATTENTION_WITH_LSE: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def merged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prefix: tuple[torch.Tensor, torch.Tensor],
    kwargs: Mapping[str, Any],
    mask_cache: dict[Any, tuple[Any, Any]] | None = None,
) -> tuple[torch.Tensor, None] | None:
    """sdpa over ``prefix + real`` keys without concatenating them: two fused attentions
    merged by their log-sum-exps.

    Args:
        module: the calling attention module (for ``is_causal``).
        query: ``(B, H, T, D)``.
        key, value: ``(B, kv_heads, S, D)``, the real (cached) keys and values.
        attention_mask: ``None`` (sdpa's implicit top-left causal pattern when ``T > 1``) or
            a mask ``(B|1, 1, T, S)`` shared by all heads, bool (``True = attend``) or additive float.
        prefix: keys and values ``(kv_heads, P, D)`` each.
        kwargs: the attention call's remaining keyword arguments (``scaling``, ``dropout``, ...).
        mask_cache: per-forward memo for the prepared mask.

    Returns:
        ``(output (B, T, H, D), None)`` as sdpa's integration returns it, or ``None`` when
        this path does not apply and the caller must concatenate instead.
    """
    kernel = _FUSED_ATTENTION_WITH_LSE
    if (
        kernel is None
        or query.device.type != "cpu"
        or torch.is_grad_enabled()
        or kwargs.get("dropout", 0.0)
        or any(kwargs.get(name) is not None for name in _DISQUALIFYING_KWARGS)
        or query.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or key.dtype != query.dtype
    ):
        return None
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        return None
    prepared = _prepared_mask(attention_mask, query.dtype, mask_cache)
    if prepared is False:
        return None
    additive_mask, has_real_key = prepared
    is_causal = attention_mask is None and q_len > 1 and wants_causal(module, kwargs)
    if is_causal:  # sdpa's top-left causal pattern over the first T keys (StaticCache prefill)
        key, value = key[:, :, :q_len], value[:, :, :q_len]  # (B, kv_heads, T, D)
    scale = kwargs.get("scaling")
    groups = heads // kv_heads
    prefix_key = prefix[0].to(dtype=query.dtype)[None].expand(batch, -1, -1, -1)  # (B, kv_heads, P, D)
    prefix_value = prefix[1].to(dtype=query.dtype)[None].expand(batch, -1, -1, -1)
    if q_len == 1:
        # One query token: a group's heads become query rows over their shared kv head.
        rows = query.reshape(batch, kv_heads, groups, head_dim)  # (B, kv_heads, g, D)
    else:
        rows = query
        if groups > 1:  # once per prefill, not per decode step
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            prefix_key = prefix_key.repeat_interleave(groups, dim=1)  # (B, H, P, D)
            prefix_value = prefix_value.repeat_interleave(groups, dim=1)
    real_out, real_lse = kernel(rows, key, value, 0.0, is_causal, attn_mask=additive_mask, scale=scale)
    prefix_out, prefix_lse = kernel(rows, prefix_key, prefix_value, 0.0, False, scale=scale)
    real_share = torch.sigmoid(real_lse.float() - prefix_lse.float()).unsqueeze(-1)  # (B, heads', rows, 1)
    if has_real_key is not None:
        real_share = real_share * has_real_key  # the kernel reports lse 0 for a fully masked row
    # prefix_out + real_share * (real_out - prefix_out), in float32
    merged = torch.lerp(prefix_out.float(), real_out.float(), real_share).to(query.dtype)
    if q_len == 1:
        return merged.reshape(batch, 1, heads, head_dim), None  # (B, 1, H, D)
    return merged.transpose(1, 2), None  # (B, T, H, D)


def _prepared_mask(mask: torch.Tensor | None, dtype: torch.dtype, mask_cache: dict[Any, tuple[Any, Any]] | None) -> Any:
    """``(additive mask in the query dtype, has-a-visible-real-key (B|1, 1, T, 1) float)``,
    ``(None, None)`` without a mask, or ``False`` when the mask's shape does not fit this path."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    cache_key = ("decode", id(mask))
    cached = mask_cache.get(cache_key) if mask_cache is not None else None
    if cached is not None and cached[0] is mask:
        return cached[1]
    if mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        visible = mask.any(dim=-1, keepdim=True)  # (B|1, 1, T, 1)
    else:
        additive = mask.to(dtype)
        visible = (mask > torch.finfo(mask.dtype).min).any(dim=-1, keepdim=True)
    prepared = (additive, visible.to(torch.float32))
    if mask_cache is not None:
        mask_cache[cache_key] = (mask, prepared)
    return prepared
