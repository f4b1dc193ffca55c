"""LLaVA and other multimodal models that keep a language model under ``text_config``.

The prefix attaches to the language model's layers only: the vision tower and the
projector never see it (the per-forward state enters at the language model's root, so
the vision tower's attention calls pass the interposer unchanged). Everything about the
language model (its attention modules, kv heads, root, positions, site hooks) is asked
of the adapter registered for ``text_config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.prefix.architecture import ArchitectureAdapter, AttentionSite, CurrentState, adapter_for

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack
    from prefix_hooks.prefix.config import PrefixTuningConfig


def language_model(model: nn.Module) -> nn.Module:
    """The language model inside a multimodal ``model`` (``get_decoder()``, checked against ``text_config``).

    Raises:
        ValueError: the model has no separate language model of its ``text_config`` type.
    """
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    decoder_type = getattr(getattr(decoder, "config", None), "model_type", None)
    if (
        text_config is None
        or not isinstance(decoder, nn.Module)
        or decoder is model
        or decoder_type != text_config.model_type
    ):
        raise ValueError(
            f"{type(model).__name__} keeps no language model of its text_config type "
            f"{getattr(text_config, 'model_type', None)!r} (get_decoder() gave {type(decoder).__name__})"
        )
    return decoder


@dataclass(frozen=True)
class TextTowerAdapter(ArchitectureAdapter):
    """A multimodal model whose prefix goes into its language model, served by the text family's adapter."""

    def attention_sites(self, model: nn.Module, config: PrefixTuningConfig | None = None) -> list[AttentionSite]:
        text_model = language_model(model)
        return adapter_for(text_model).attention_sites(text_model, config)

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        return adapter_for(module).kv_shape(module, config)

    def base_model(self, model: nn.Module) -> nn.Module:
        text_model = language_model(model)
        return adapter_for(text_model).base_model(text_model)

    def unsupported_reason(self, model: nn.Module) -> str | None:
        try:
            text_model = language_model(model)
        except ValueError as error:
            return str(error)
        text_adapter = adapter_for(text_model)
        reason = text_adapter.unsupported_reason(text_model)
        return None if reason is None else f"{self.name}'s language model: {reason}"

    def interposer_serves(self, site: AttentionSite) -> bool:
        return adapter_for(site.module).interposer_serves(site)

    def install_site_hooks(self, sites: list[AttentionSite], current_state: CurrentState, undo: UndoStack) -> None:
        if sites:
            adapter_for(sites[0].module).install_site_hooks(sites, current_state, undo)

    def default_position_offset(self, root: nn.Module, num_virtual_tokens: int) -> int:
        return adapter_for(root).default_position_offset(root, num_virtual_tokens)

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        return adapter_for(root).position_offset_error(root, offset)

    def offset_positions(self, call: ForwardCall, offset: int) -> None:
        if call.module is None:
            raise ValueError(f"{self.name}: the call does not name its root module; cannot find the language model")
        adapter_for(call.module).offset_positions(call, offset)


ADAPTER = TextTowerAdapter(name="llava", model_types=("llava",), attention_classes=())
