"""MPT: alibi, no position ids; its bool mask means ``True = masked``; attention inline on every release
(its cache argument is ``past_key_values``, ``cache`` since 5.24, read from the signature).

The attention module takes the last ``S_k`` columns of ``position_bias`` ``(H, 1, max_seq_len)``
(``slope * (k - (S_k - 1))``, relative to the newest key), so with ``P`` prefix keys in front
the prefix gets the bias of the ``P`` slots before the first key slot, as in PEFT. The bias is
extended on the left by ``P`` columns so that sequences up to ``max_seq_len`` still fit.
With left padding the pad slots lie between the prefix and the tokens (this bias has no batch
dimension), so a left-padded row differs slightly from the row alone, as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import POSITION_BIAS_KEYWORD
from prefix_hooks.families._inline import PositionFreeAdapter, memoized
from prefix_hooks.prefix.architecture import SpliceSource


def widen_position_bias(bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``(H, 1, L)`` with ``bias[..., k] = slope * (k - (L - 1))`` -> ``(H, 1, P + L)``, same slopes."""
    slopes = bias[..., -1:] - bias[..., -2:-1]  # (H, 1, 1): slope * 0 - slope * (-1)
    length = bias.shape[-1]
    relative = torch.arange(-num_prefix - length + 1, -length + 1, device=bias.device, dtype=bias.dtype)  # (P,)
    return torch.cat([slopes * relative, bias], dim=-1)  # (H, 1, P + L)


@dataclass(frozen=True)
class MptAdapter(PositionFreeAdapter):
    """Mask columns ``False`` (not masked); ``position_bias`` grown by ``P`` columns on the left."""

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        super().extend_arguments(module, call, num_prefix, state)
        bias = call.get(POSITION_BIAS_KEYWORD)
        if isinstance(bias, torch.Tensor):
            widened = memoized(state, "position_bias", bias, lambda: widen_position_bias(bias, num_prefix))
            call.set(POSITION_BIAS_KEYWORD, widened)


ADAPTER = MptAdapter(
    name="mpt",
    model_types=("mpt",),
    attention_classes=("MptAttention",),
    mask_fill=False,
)
