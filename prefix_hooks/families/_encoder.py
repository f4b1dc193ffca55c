"""What bidirectional encoders share: text encoders (BERT and its relatives) and ViT-style
vision encoders.

Their self-attention modules call the attention-function registry, so the interposer
splices the prefix; masks are bidirectional (eager: additive float ``(B, 1, T, T)``,
sdpa: bool or ``None`` with ``module.is_causal = False``) and there is no cache. What
differs from decoders:

* several families' attention modules carry no ``layer_idx`` (DistilBERT, ViT), so the
  prefix slots are numbered in module order, which is layer order for every encoder here;
* learned absolute positions have a table of ``max_position_embeddings`` rows, which the
  offset must not run past;
* vision encoders take no position inputs at all (patch positions are fixed by the grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.prefix.architecture import ArchitectureAdapter, AttentionSite

if TYPE_CHECKING:
    from prefix_hooks.prefix.config import PrefixTuningConfig


def _config_of(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a transformers PreTrainedModel")
    return config


@dataclass(frozen=True)
class EncoderAdapter(ArchitectureAdapter):
    """A bidirectional encoder: one prefix slot per self-attention module, in module order.

    Attributes:
        max_positions_attr: config attribute holding the size of the learned position
            table (``"max_position_embeddings"``), or ``None`` for rotary/relative positions;
            used to refuse an offset that runs past the table with a clear message.
    """

    max_positions_attr: str | None = "max_position_embeddings"

    def attention_sites(self, model: nn.Module, config: PrefixTuningConfig | None = None) -> list[AttentionSite]:
        """Every self-attention module, its slot being its rank in module order (= layer order)."""
        model_config = _config_of(model)
        modules = [module for module in model.modules() if type(module).__name__ in self.attention_classes]
        sites = []
        for layer, module in enumerate(modules):
            kv_heads, head_dim = self.kv_shape(module, model_config)
            sites.append(AttentionSite(module, layer, kv_heads, head_dim))
        return sites

    def unsupported_reason(self, model: nn.Module) -> str | None:
        config = _config_of(model)
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return (
                f"{self.name} configured as a decoder (is_decoder={getattr(config, 'is_decoder', False)}, "
                f"add_cross_attention={getattr(config, 'add_cross_attention', False)}) is not supported; "
                f"prefix tuning supports {self.name} as a bidirectional encoder (is_decoder=False, "
                "add_cross_attention=False)"
            )
        return None

    def offset_positions(self, call: ForwardCall, offset: int) -> None:
        """Shift the real tokens' positions by ``offset``, refusing positions past the learned table."""
        self.shift_positions(call, offset)
        positions = call.get("position_ids")
        limit = self._max_positions(call)
        if limit is None or not isinstance(positions, torch.Tensor) or positions.numel() == 0:
            return
        largest = int(positions.max())
        if largest >= limit:
            seq_len = positions.shape[-1]
            raise ValueError(
                f"position_offset={offset} puts the last of {seq_len} tokens at position {largest}, but "
                f"{self.name} has max_position_embeddings={limit}; pass at most {limit - (largest + 1 - seq_len)} "
                "tokens or set position_offset=0"
            )

    def shift_positions(self, call: ForwardCall, offset: int) -> None:
        """Pass the shifted positions in ``call`` (the base class's arange from ``offset``)."""
        super().offset_positions(call, offset)

    def _max_positions(self, call: ForwardCall) -> int | None:
        if self.max_positions_attr is None:
            return None
        config = _call_config(call)
        return None if config is None else getattr(config, self.max_positions_attr, None)


def _call_config(call: ForwardCall) -> Any:
    """The config of the model that receives ``call`` (``None`` if it cannot be found)."""
    return getattr(call.module, "config", None)


@dataclass(frozen=True)
class PaddingAwarePositionsAdapter(EncoderAdapter):
    """RoBERTa-style positions: derived from ``input_ids`` and the padding index.

    The model numbers real tokens ``padding_idx + 1, padding_idx + 2, ...`` (padding
    tokens do not advance the count and sit at ``padding_idx``). PEFT passes the prefix
    as a cache of length ``P``, which shifts real tokens to ``padding_idx + P + 1, ...``;
    the default offset reproduces exactly that. Without ``input_ids`` (embeddings passed)
    the model counts every token as real, and the offset shifts them all (PEFT does not
    shift positions computed from embeddings; we keep ids and embeddings consistent).
    """

    def shift_positions(self, call: ForwardCall, offset: int) -> None:
        positions = call.get("position_ids")
        if positions is not None:
            call.set("position_ids", positions + offset)
            return
        padding_idx = getattr(_call_config(call), "pad_token_id", None)
        if padding_idx is None:
            raise ValueError(
                f"{self.name}: cannot offset positions without the model's pad_token_id; pass position_ids "
                "or set position_offset=0"
            )
        positions = _padding_aware_positions(call, int(padding_idx), offset)
        if positions is not None:
            call.set("position_ids", positions)


def _padding_aware_positions(call: ForwardCall, padding_idx: int, offset: int) -> torch.Tensor | None:
    """``(B, T)`` positions: real tokens ``padding_idx + offset + 1, ...``, padding at ``padding_idx``;
    ``None`` when the call has neither ``input_ids`` nor ``inputs_embeds``."""
    input_ids = call.get("input_ids")
    if input_ids is not None:
        real = input_ids.ne(padding_idx).long()  # (B, T), 1 = real token
        return (torch.cumsum(real, dim=1) + offset) * real + padding_idx  # (B, T)
    embeds = call.get("inputs_embeds")
    if embeds is None:
        return None
    batch, seq_len = embeds.shape[:2]
    start = padding_idx + offset + 1
    return torch.arange(start, start + seq_len, device=embeds.device).expand(batch, -1)  # (B, T)


@dataclass(frozen=True)
class VisionEncoderAdapter(EncoderAdapter):
    """A ViT-style image encoder: no position inputs, so the offset is always 0."""

    max_positions_attr: str | None = None

    def default_position_offset(self, root: nn.Module, num_virtual_tokens: int) -> int:
        return 0

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        if offset:
            return (
                f"position_offset={offset}: {self.name} takes no position inputs (patch positions are fixed by "
                "the image grid), so real tokens cannot be shifted behind the prefix; leave position_offset=None "
                "or set it to 0"
            )
        return None
