"""BLOOM: alibi, no position ids; the root builds ``alibi`` ``(B * H, 1, S)`` from the 2-D mask
(positions counted from each row's first real token) and an additive float mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.families._inline import PositionFreeAdapter, memoized, prefix_alibi, widen_alibi
from prefix_hooks.families.base import ForwardCall, SpliceSource


@dataclass(frozen=True)
class BloomAdapter(PositionFreeAdapter):
    """The mask gets ``P`` zero columns, ``alibi`` the prefix's bias at positions ``-P..-1``."""

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        super().extend_arguments(module, call, num_prefix, state)
        alibi = call.get("alibi")
        num_heads = int(module.num_heads)  # type: ignore[arg-type]

        def widened() -> torch.Tensor:
            # imported on first use, so that `import prefix_hooks` does not load every model file
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            columns = prefix_alibi(build_alibi_tensor, num_heads, num_prefix, alibi.dtype, alibi.device)  # (H, 1, P)
            return widen_alibi(alibi, columns)  # (B * H, 1, P + S)

        call.set("alibi", memoized(state, "alibi", alibi, widened))


ADAPTER = BloomAdapter(
    name="bloom",
    model_types=("bloom",),
    attention_classes=("BloomAttention",),
)
