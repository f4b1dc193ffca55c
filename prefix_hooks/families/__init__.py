"""Registry of architecture adapters, one module per model family.

``supported()`` lists the model types that work; ``register_family`` adds an adapter
for an architecture of your own (see :class:`ArchitectureAdapter` for the interface).
"""

from __future__ import annotations

from torch import nn

from prefix_hooks.families import gemma, gpt2, gpt_neox, llama, mistral, opt, phi3, qwen2, qwen3
from prefix_hooks.families.base import (
    ArchitectureAdapter,
    AttentionSite,
    ModelDims,
    PositionInputs,
)

__all__ = [
    "ArchitectureAdapter",
    "AttentionSite",
    "ModelDims",
    "PositionInputs",
    "UnsupportedModelError",
    "adapter_for",
    "register_family",
    "supported",
]

_ADAPTERS: dict[str, ArchitectureAdapter] = {}


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


def register_family(adapter: ArchitectureAdapter, *, replace: bool = False) -> None:
    """Make ``adapter`` serve each of its ``model_types``.

    Raises:
        ValueError: a model type already has an adapter and ``replace`` is False.
    """
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS and not replace:
            raise ValueError(
                f"model_type {model_type!r} already has the adapter {_ADAPTERS[model_type].name!r}; "
                "pass replace=True to override it"
            )
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


def supported() -> list[str]:
    """Model types (``config.model_type``) that prefix tuning supports, sorted."""
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter serving ``model``.

    Raises:
        UnsupportedModelError: no adapter serves the model's ``config.model_type``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model_type={model_type!r} ({type(model).__name__}) is not supported; supported families: "
            f"{', '.join(supported())}. Register your own with "
            "prefix_hooks.families.register_family(ArchitectureAdapter(...))"
        )
    return _ADAPTERS[model_type]


for _module in (llama, mistral, qwen2, qwen3, gemma, phi3, gpt2, gpt_neox, opt):
    register_family(_module.ADAPTER)
