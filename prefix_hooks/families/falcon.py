"""Falcon: rotary or alibi; multi-query (one kv head), grouped (``new_decoder_architecture``) or full.

Every release served here calls ``layer_past.update`` in the attention module, so the prefix
always arrives through the module-level cache view (:mod:`prefix_hooks.prefix.cache_view`), also
since transformers 5.25 where the module attends through the registry: its decoder layer does
not pass ``**kwargs`` down (the per-forward state never reaches the registry function), and
the registry function receives the module's mask argument unchanged, which is where Falcon's
alibi lives. The root always materialises that mask (``allow_is_causal_skip=False``), so
sdpa's implicit-causal ``mask=None`` path is never taken.

Keys arrive rotated (rotary) and, before the cache update, at the module's ``num_kv_heads``
(1 for multi-query), except that with ``new_decoder_architecture`` the inline attention of
5.23 and older broadcast them to every query head first; the registry-based attention of
5.25 keeps them at ``num_kv_heads`` (the attention function repeats them).

With ``alibi=True`` the root folds ``alibi / sqrt(head_dim)`` into the float mask
``(B, H, T, S)`` (masked keys at the dtype's minimum); the inline attention of 5.23 and older
also takes ``alibi`` ``(B, H, 1, S)`` itself and adds it once more. Each gets the prefix's
alibi columns (positions ``-P..-1``, as PEFT's cached prefix gets them). Rotary position ids
are shifted by the default offset like any RoPE model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import (
    ALIBI_KEYWORD,
    MASK_KEYWORD,
    alibi_builder,
    alibi_enabled,
    registry_kv_heads,
)
from prefix_hooks.families._inline import InlineAttentionAdapter, memoized, prefix_alibi, widen_alibi
from prefix_hooks.prefix.architecture import SpliceSource


@dataclass(frozen=True)
class FalconAdapter(InlineAttentionAdapter):
    """Falcon's kv heads and its alibi mask columns; a cache view on every release."""

    def serves_through_registry(self, module: nn.Module) -> bool:
        # the layers drop **kwargs and the alibi is in the mask: see the module docstring
        return False

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        num_heads, head_dim = int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]
        kv_heads = registry_kv_heads(module, num_heads)
        if kv_heads is None:  # inline: new_decoder_architecture broadcasts kv heads before the cache update
            broadcast = bool(module.new_decoder_architecture)
            kv_heads = num_heads if broadcast else int(module.num_kv_heads)  # type: ignore[arg-type]
        return kv_heads, head_dim

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        mask = call.get(MASK_KEYWORD)
        if mask is None and _query_length(call) > 1:
            raise ValueError(
                "falcon: the attention module got no mask for several queries; the prefix needs the explicit mask "
                "FalconModel always builds (an sdpa call without one would read it as causal over the prefix)"
            )
        if not alibi_enabled(module):  # rotary: P visible mask columns
            super().extend_arguments(module, call, num_prefix, state)
            return
        build_alibi_tensor = alibi_builder(module)
        if build_alibi_tensor is None:
            raise ValueError(f"falcon with alibi: the model file of {type(module).__name__} has no build_alibi_tensor")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not mask.is_floating_point():
            kind = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"falcon with alibi: expected the root's float (B, H, T, S) mask, got {kind}")
        num_heads, head_dim = int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]
        alibi = call.get(ALIBI_KEYWORD)  # (B, H, 1, S), only where the module adds it itself
        like = alibi if isinstance(alibi, torch.Tensor) else mask
        columns = memoized(
            state, "alibi-columns", mask,
            lambda: prefix_alibi(build_alibi_tensor, num_heads, num_prefix, like.dtype, like.device),
        )  # (H, 1, P), rounded as the root rounds the alibi it builds
        if isinstance(alibi, torch.Tensor):
            widened_alibi = memoized(state, "alibi", alibi, lambda: widen_alibi(alibi, columns))  # (B, H, 1, P + S)
            call.set(ALIBI_KEYWORD, widened_alibi)

        def widened_mask() -> torch.Tensor:
            batch, heads, q_len, _ = mask.shape
            front = (columns.to(mask.dtype) / math.sqrt(head_dim))[None]  # (1, H, 1, P), as the root scales alibi
            return torch.cat([front.expand(batch, heads, q_len, num_prefix), mask], dim=-1)  # (B, H, T, P + S)

        call.set(MASK_KEYWORD, memoized(state, "mask", mask, widened_mask))


def _query_length(call: ForwardCall) -> int:
    """Tokens in the call's hidden states ``(B, T, hidden)``, the forward's first parameter."""
    hidden = call.get(call.params[0]) if call.params else None
    return int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 1


ADAPTER = FalconAdapter(
    name="falcon",
    model_types=("falcon",),
    attention_classes=("FalconAttention",),
)
