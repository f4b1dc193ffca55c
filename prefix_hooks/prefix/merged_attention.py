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

from prefix_hooks.prefix.splice import wants_causal

_DISQUALIFYING_KWARGS = ("softcap", "s_aux", "position_bias")


# CPU fused attention that also returns the log-sum-exp; absent in other torch builds
_FUSED_ATTENTION_WITH_LSE: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _kernel_shares_kv_heads() -> bool:
    """Whether the kernel takes fewer kv heads than query heads (grouped-query attention)
    and maps them as sdpa's ``enable_gqa`` does; probed once on a tiny input."""
    if _FUSED_ATTENTION_WITH_LSE is None:
        return False
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 2, 8, generator=generator)  # (B, H=4, T, D)
    key, value = torch.randn(2, 1, 2, 3, 8, generator=generator)  # (B, kv_heads=2, S, D) each
    try:
        with torch.no_grad():
            out, _ = _FUSED_ATTENTION_WITH_LSE(query, key, value, 0.0, False)
    except RuntimeError:
        return False
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    )
    return bool(torch.allclose(out, want, atol=1e-6))


_KERNEL_SHARES_KV_HEADS = _kernel_shares_kv_heads()


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
        prefix: keys and values ``(kv_heads, P, D)`` each, or ``(B, kv_heads, P, D)`` already batched.
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
        or not all(kwargs.get(name) is None for name in _DISQUALIFYING_KWARGS)
        or query.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or key.dtype != query.dtype
        or value.dtype != query.dtype  # autocast can hand over float32 q/k with a bf16 v
    ):
        return None
    batch, heads, q_len, _ = query.shape
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
    prefix_key, prefix_value = (_batched(part, batch, query.dtype) for part in prefix)  # (B, kv_heads, P, D)
    if not _KERNEL_SHARES_KV_HEADS and heads != kv_heads:  # older kernels: one kv head per query head
        groups = heads // kv_heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        prefix_key, prefix_value = prefix_key.repeat_interleave(groups, 1), prefix_value.repeat_interleave(groups, 1)
    # the kernel maps query head h to kv head h // (H / kv_heads) itself, as sdpa's enable_gqa does
    real_out, real_lse = kernel(query, key, value, 0.0, is_causal, attn_mask=additive_mask, scale=scale)  # (B, H, T, D), (B, H, T)
    prefix_out, prefix_lse = kernel(query, prefix_key, prefix_value, 0.0, False, scale=scale)
    # share of the real keys in the softmax over [prefix; real]: sigmoid(lse_r - lse_p)
    real_share = torch.sub(real_lse, prefix_lse).sigmoid_().unsqueeze(-1)  # (B, H, T, 1), float32
    if has_real_key is not None:
        real_share.mul_(has_real_key)  # the kernel reports lse 0 for a fully masked row
    if query.dtype == torch.float32:
        merged = torch.lerp(prefix_out, real_out, real_share)  # (B, H, T, D)
    else:
        merged = torch.lerp(prefix_out.float(), real_out.float(), real_share).to(query.dtype)
    return merged.transpose(1, 2), None  # (B, T, H, D)


def _batched(prefix: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, kv_heads, P, D)`` in ``dtype`` from a ``(kv_heads, P, D)`` or already batched prefix."""
    if prefix.dim() == 3:
        return prefix.to(dtype)[None].expand(batch, -1, -1, -1)
    return prefix if prefix.dtype == dtype else prefix.to(dtype)


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
