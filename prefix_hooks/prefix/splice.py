"""Put a prefix in front of one attention call's keys, values and mask.

Conventions, per attention backend (measured on transformers 5.23):

* eager: the mask is additive float ``(B|1, 1|H, T, S)``; the prefix columns get ``0``.
* sdpa: the mask is bool (``True = attend``) or additive float; the prefix columns get
  ``True``/``0``. ``mask=None`` with ``T > 1`` means *top-left* causal over the real
  keys (and transformers slices keys to ``T`` on that path), so the pattern is
  rebuilt explicitly: real keys cut to ``T``, then ``P`` visible columns and a
  lower-triangular block.
* flash: the mask is the 2-D padding mask ``(B, S)`` (``1 = real``); the prefix gets
  ``P`` ones. ``None`` needs nothing: flash's causal mask is bottom-right aligned.
* flex_attention: the mask is a ``BlockMask``; it is rebuilt over ``P + S`` keys with
  a mask_mod that lets every query see the prefix and defers to the original for the
  real keys (shifted by ``P``).

Keys and values arrive after RoPE and after the cache update, at ``kv_heads``; the
prefix is never rotated, never repeated for grouped-query attention, and never
written into the cache.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


class Backend(enum.Enum):
    """How an attention function reads its mask."""

    EAGER = "eager"
    SDPA = "sdpa"
    FLASH = "flash"
    FLEX = "flex"
    UNSUPPORTED = "unsupported"


def backend_of(attn_implementation: str | None) -> Backend:
    """Classify a ``config._attn_implementation`` string."""
    if attn_implementation is None or attn_implementation == "eager":
        return Backend.EAGER
    if attn_implementation == "sdpa":
        return Backend.SDPA
    if attn_implementation.startswith("flash_attention_") or attn_implementation.endswith("flash-attn"):
        return Backend.FLASH
    if attn_implementation == "flex_attention":
        return Backend.FLEX
    return Backend.UNSUPPORTED


SUPPORTED_IMPLEMENTATIONS = (
    "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
)


def wants_causal(module: nn.Module, kwargs: Mapping[str, Any]) -> bool:
    """Whether sdpa reads ``mask=None`` as causal for this call (the ``is_causal`` kwarg, else the module's)."""
    requested = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if requested is None else requested)


def _attend_fill(mask: torch.Tensor) -> bool | float:
    """The value that means "attend" in ``mask``'s convention."""
    if mask.dtype == torch.bool:
        return True
    if mask.is_floating_point():
        return 0.0  # additive mask
    return 1  # integer padding mask (flash)


def extend_mask(mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Prepend ``num_prefix`` always-visible key columns to ``mask``.

    Args:
        mask: ``(..., S)`` in any convention (bool attend, additive float, 0/1 int).
        num_prefix: ``P``.

    Returns:
        ``(..., P + S)``.
    """
    visible = mask.new_full((*mask.shape[:-1], num_prefix), _attend_fill(mask))  # (..., P)
    return torch.cat([visible, mask], dim=-1)  # (..., P + S)


def extend_block_mask(block_mask: BlockMask, num_prefix: int) -> BlockMask:
    """Rebuild a flex ``BlockMask`` over ``num_prefix`` always-visible keys plus the real ones.

    Returns:
        a ``BlockMask`` of shape ``(B, H, T, P + S)``.
    """
    batch, heads, q_len, kv_len = block_mask.shape
    real_mask_mod = block_mask.mask_mod

    def mask_mod_with_prefix(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        real = real_mask_mod(b, h, q_idx, (kv_idx - num_prefix).clamp(min=0))  # real key kv_idx - P
        return (kv_idx < num_prefix) | real

    return create_block_mask(
        mask_mod_with_prefix, batch, heads, q_len, kv_len + num_prefix,
        device=block_mask.kv_num_blocks.device, BLOCK_SIZE=block_mask.BLOCK_SIZE,
    )


def causal_mask_with_prefix(q_len: int, num_prefix: int, device: torch.device) -> torch.Tensor:
    """Top-left causal pattern over ``q_len`` real keys behind ``num_prefix`` visible ones.

    Returns:
        bool ``(1, 1, T, P + T)``, ``True = attend``.
    """
    visible = torch.ones(q_len, num_prefix, dtype=torch.bool, device=device)  # (T, P)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()  # (T, T)
    return torch.cat([visible, causal], dim=-1)[None, None]  # (1, 1, T, P + T)


def extended_mask(attention_mask: Any, num_prefix: int, mask_cache: dict[Any, tuple[Any, Any]] | None) -> Any:
    """A layer's mask over ``P`` always-visible prefix keys plus the real ones, built once per mask object.

    Args:
        attention_mask: a ``BlockMask`` or a mask tensor ``(..., S)`` in any convention.
        num_prefix: ``P``.
        mask_cache: per-forward memo so that layers sharing one mask extend it once.

    Returns:
        ``(B, H, T, P + S)`` for a ``BlockMask``, ``(..., P + S)`` for a tensor.

    Raises:
        TypeError: a mask of another type.
    """
    cached = mask_cache.get(id(attention_mask)) if mask_cache is not None else None
    if cached is not None and cached[0] is attention_mask:
        return cached[1]
    extended: Any
    if isinstance(attention_mask, BlockMask):
        extended = extend_block_mask(attention_mask, num_prefix)  # (B, H, T, P + S)
    elif isinstance(attention_mask, torch.Tensor):
        extended = extend_mask(attention_mask, num_prefix)  # (..., P + S)
    else:
        raise TypeError(
            f"attention mask of type {type(attention_mask).__name__} is not supported with a prefix; "
            f"supported attention implementations: {', '.join(SUPPORTED_IMPLEMENTATIONS)}"
        )
    if mask_cache is not None:
        mask_cache[id(attention_mask)] = (attention_mask, extended)
    return extended


def splice_prefix(
    backend: Backend,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    prefix: tuple[torch.Tensor, torch.Tensor],
    kwargs: Mapping[str, Any],
    mask_cache: dict[Any, tuple[Any, Any]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Concatenate the prefix in front of ``key``/``value`` and extend the mask to match.

    Args:
        backend: the attention function's mask convention.
        module: the calling attention module (for ``is_causal``).
        query: ``(B, H, T, D)``.
        key, value: ``(B, kv_heads, S, D)``, after RoPE and the cache update.
        attention_mask: the mask the model built for this layer, or ``None``.
        prefix: keys and values ``(kv_heads, P, D)`` each, or ``(B, kv_heads, P, D)`` already batched.
        kwargs: the remaining keyword arguments of the attention call.
        mask_cache: per-forward memo so that layers sharing one mask extend it once.

    Returns:
        ``key``, ``value`` of shape ``(B, kv_heads, P + S', D)`` and the extended mask,
        where ``S' = S`` except on sdpa's implicit-causal path (``S' = T``).
    """
    prefix_key, prefix_value = prefix
    q_len = query.shape[2]
    batch = key.shape[0]
    num_prefix = prefix_key.shape[-2]

    if attention_mask is None:
        if backend is Backend.SDPA and q_len > 1 and wants_causal(module, kwargs):
            # sdpa's `mask=None` means top-left causal over the first T keys (StaticCache prefill).
            key = key[:, :, :q_len]  # (B, kv_heads, T, D)
            value = value[:, :, :q_len]
            cache_key = ("causal", q_len, num_prefix, key.device)  # every layer of a forward builds the same
            cached = mask_cache.get(cache_key) if mask_cache is not None else None
            if cached is None:
                cached = (None, causal_mask_with_prefix(q_len, num_prefix, key.device))  # (1, 1, T, P + T)
                if mask_cache is not None:
                    mask_cache[cache_key] = cached
            attention_mask = cached[1]
    else:
        attention_mask = extended_mask(attention_mask, num_prefix, mask_cache)

    if prefix_key.dim() == 3:  # (kv_heads, P, D): expand over the batch
        prefix_key, prefix_value = prefix_key[None].expand(batch, -1, -1, -1), prefix_value[None].expand(batch, -1, -1, -1)
    if prefix_key.dtype != key.dtype or prefix_key.device != key.device:
        prefix_key = prefix_key.to(dtype=key.dtype, device=key.device)
        prefix_value = prefix_value.to(dtype=value.dtype, device=value.device)
    key = torch.cat([prefix_key, key], dim=2)  # (B, kv_heads, P + S, D)
    value = torch.cat([prefix_value, value], dim=2)  # (B, kv_heads, P + S, D)
    return key, value, attention_mask
