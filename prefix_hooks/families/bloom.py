"""BLOOM: alibi, no position ids; attention inline on every release (cache argument ``layer_past``).

The root builds ``alibi`` ``(B * H, 1, S)`` from the 2-D mask (positions counted from each
row's first real token; without a mask, 5.25 counts from the first key slot, the same) and an
additive float mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import ALIBI_KEYWORD, alibi_builder
from prefix_hooks.families._inline import PositionFreeAdapter, memoized, prefix_alibi, widen_alibi
from prefix_hooks.prefix.architecture import SpliceSource


@dataclass(frozen=True)
class BloomAdapter(PositionFreeAdapter):
    """The mask gets ``P`` zero columns, ``alibi`` the prefix's bias at positions ``-P..-1``."""

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        super().extend_arguments(module, call, num_prefix, state)
        alibi = call.get(ALIBI_KEYWORD)
        num_heads = int(module.num_heads)  # type: ignore[arg-type]
        build_alibi_tensor = alibi_builder(module)
        if not isinstance(alibi, torch.Tensor) or build_alibi_tensor is None:
            raise ValueError(
                f"bloom: expected {type(module).__name__} to get an alibi tensor and its model file to define "
                f"build_alibi_tensor; got {type(alibi).__name__} and {build_alibi_tensor!r}"
            )

        def widened() -> torch.Tensor:
            columns = prefix_alibi(build_alibi_tensor, num_heads, num_prefix, alibi.dtype, alibi.device)  # (H, 1, P)
            return widen_alibi(alibi, columns)  # (B * H, 1, P + S)

        call.set(ALIBI_KEYWORD, memoized(state, "alibi", alibi, widened))


ADAPTER = BloomAdapter(
    name="bloom",
    model_types=("bloom",),
    attention_classes=("BloomAttention",),
)
