"""What an architecture adapter tells the library about one model family.

An adapter answers four questions about a model: which modules are its attention
layers (and their layer index), how many key/value heads and what head size each
produces, which module receives the inputs and passes ``**kwargs`` down to the
attention function, and which positions the model gives its tokens by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionSite:
    """One attention module that receives a prefix.

    Attributes:
        module: the attention module (the one that calls the attention function).
        layer: its index into the prefix, ``0..L-1`` (the model's ``layer_idx``).
        kv_heads: key/value heads the module produces.
        head_dim: size of one head.
    """

    module: nn.Module
    layer: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a model's prefix, as read from its attention layers."""

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    num_transformer_submodules: int = 1


@dataclass(frozen=True)
class PositionInputs:
    """What the root model was called with, as far as positions are concerned.

    Attributes:
        seq_len: number of new tokens ``T`` in this call.
        past_len: tokens already in the cache.
        attention_mask: the 2-D ``(B, past_len + T)`` mask (``1 = real token``) or ``None``.
        device: where the positions must live.
    """

    seq_len: int
    past_len: int
    attention_mask: torch.Tensor | None
    device: torch.device


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How prefix tuning finds its way into one family of transformers models.

    Register an instance with :func:`prefix_hooks.families.register_family` to support
    another architecture whose attention modules call
    ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` and pass ``**kwargs`` down to it.

    Attributes:
        name: the family's name (used in messages).
        model_types: ``config.model_type`` values this adapter serves.
        attention_classes: class names of the attention modules that get a prefix.
        head_dim_attr: attribute of the attention module holding the head size.
    """

    name: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]
    head_dim_attr: str = "head_dim"
    num_transformer_submodules: int = field(default=1)

    def base_model(self, model: nn.Module) -> nn.Module:
        """The module that takes ``input_ids``/``position_ids`` and runs the layers."""
        return getattr(model, "base_model", model)

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` that ``module`` produces."""
        head_dim = int(getattr(module, self.head_dim_attr))
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # type: ignore[attr-defined]
        return int(kv_heads), head_dim

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        """Every attention module of ``model`` that gets a prefix, ordered by layer."""
        config = _text_config(model)
        sites = []
        for module in model.modules():
            if type(module).__name__ in self.attention_classes:
                layer = getattr(module, "layer_idx", None)
                if layer is None:
                    raise ValueError(f"{type(module).__name__} has no layer_idx; cannot place its prefix")
                kv_heads, head_dim = self.kv_shape(module, config)
                sites.append(AttentionSite(module, int(layer), kv_heads, head_dim))
        sites.sort(key=lambda site: site.layer)
        if [site.layer for site in sites] != list(range(len(sites))):
            raise ValueError(
                f"{self.name}: attention layer indices {[s.layer for s in sites]} are not 0..{len(sites) - 1}"
            )
        return sites

    def unsupported_reason(self, model: nn.Module) -> str | None:
        """Why this particular model cannot take a prefix, or ``None`` when it can."""
        return None

    def position_ids(self, inputs: PositionInputs, offset: int) -> torch.Tensor:
        """Positions the model would give the new tokens if ``offset`` tokens came first.

        The default is the arange most decoders use: ``(1, T)`` from ``past_len + offset``.
        """
        start = inputs.past_len + offset
        return torch.arange(start, start + inputs.seq_len, device=inputs.device).unsqueeze(0)  # (1, T)


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a transformers PreTrainedModel")
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config
