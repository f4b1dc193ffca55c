"""Falcon: rotary or alibi; multi-query (one kv head), grouped (``new_decoder_architecture``) or full.

Attention is computed inline after ``layer_past.update``; keys arrive rotated, at the
module's ``num_kv_heads`` (1 for multi-query) or, with ``new_decoder_architecture``,
already broadcast to every query head.

With ``alibi=True`` the root folds ``alibi / sqrt(head_dim)`` into the float mask
``(B, H, T, S)`` (masked keys at the dtype's minimum) and also passes ``alibi``
``(B, H, 1, S)`` itself; both get the prefix's alibi columns (positions ``-P..-1``).
Rotary position ids are shifted by the default offset like any RoPE model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.families._inline import InlineAttentionAdapter, memoized, prefix_alibi, widen_alibi
from prefix_hooks.families.base import ForwardCall, SpliceSource


@dataclass(frozen=True)
class FalconAdapter(InlineAttentionAdapter):
    """Falcon's kv heads and its alibi arguments."""

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        # new_decoder_architecture broadcasts each kv head over its query group before the cache update
        kv_heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
        return int(kv_heads), int(module.head_dim)  # type: ignore[arg-type]

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        alibi = call.get("alibi")
        if alibi is None:  # rotary: P visible mask columns
            super().extend_arguments(module, call, num_prefix, state)
            return
        # imported on first use, so that `import prefix_hooks` does not load every model file
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor

        num_heads, head_dim = int(module.num_heads), int(module.head_dim)  # type: ignore[arg-type]
        columns = memoized(
            state, "alibi-columns", alibi,
            lambda: prefix_alibi(build_alibi_tensor, num_heads, num_prefix, alibi.dtype, alibi.device),
        )  # (H, 1, P)
        call.set("alibi", memoized(state, "alibi", alibi, lambda: widen_alibi(alibi, columns)))  # (B, H, 1, P + S)
        mask = call.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or not mask.is_floating_point():
            kind = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"falcon with alibi: expected the root's float (B, H, T, S) mask, got {kind}")

        def widened_mask() -> torch.Tensor:
            batch, heads, q_len, _ = mask.shape
            front = (columns.to(mask.dtype) / math.sqrt(head_dim))[None]  # (1, H, 1, P), as the root scales alibi
            return torch.cat([front.expand(batch, heads, q_len, num_prefix), mask], dim=-1)  # (B, H, T, P + S)

        call.set("attention_mask", memoized(state, "mask", mask, widened_mask))


ADAPTER = FalconAdapter(
    name="falcon",
    model_types=("falcon",),
    attention_classes=("FalconAttention",),
)
