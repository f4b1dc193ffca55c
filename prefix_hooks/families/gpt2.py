"""GPT-2: Conv1D projections, learned absolute positions (the offset shifts them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prefix_hooks.prefix.architecture import ArchitectureAdapter


@dataclass(frozen=True)
class GPT2Adapter(ArchitectureAdapter):
    """GPT-2 computes eager attention inline when ``reorder_and_upcast_attn`` is set."""

    def unsupported_reason(self, model: nn.Module) -> str | None:
        config: Any = model.config
        if getattr(config, "reorder_and_upcast_attn", False) and config._attn_implementation == "eager":
            return (
                "gpt2 with reorder_and_upcast_attn=True and eager attention bypasses the attention "
                "registry; load the model with attn_implementation='sdpa' or set reorder_and_upcast_attn=False"
            )
        return None


ADAPTER = GPT2Adapter(
    name="gpt2",
    model_types=("gpt2",),
    attention_classes=("GPT2Attention",),
)
