"""OPT: learned positions counted from the attention mask (padding does not advance them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.prefix.architecture import ArchitectureAdapter, PositionInputs


@dataclass(frozen=True)
class OPTAdapter(ArchitectureAdapter):
    """OPT derives positions from the cumulative attention mask, and ``OPTForCausalLM``
    calls ``model.decoder`` directly (bypassing ``OPTModel``), so the decoder is the root."""

    def base_model(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if type(module).__name__ == "OPTDecoder":
                return module
        raise ValueError(f"found no OPTDecoder in {type(model).__name__}")

    def position_ids(self, inputs: PositionInputs, offset: int) -> torch.Tensor:
        total = inputs.past_len + inputs.seq_len
        mask = inputs.attention_mask
        if mask is None:
            mask = torch.ones(1, total, dtype=torch.long, device=inputs.device)  # (1, past + T)
        mask = mask.long()
        # Real tokens count `offset` virtual tokens before them; padding stays at -1 as in OPT.
        positions = (torch.cumsum(mask, dim=1) + offset) * mask - 1  # (B, past + T)
        return positions[:, inputs.past_len :]  # (B, T)


ADAPTER = OPTAdapter(
    name="opt",
    model_types=("opt",),
    attention_classes=("OPTAttention",),
)
