"""Registry of architecture adapters, one module per model family.

``supported()`` lists the model types that work; ``register_family`` adds an adapter
for an architecture of your own (see :class:`ArchitectureAdapter` for the interface).

Every module in this package except ``base`` is a family module and is registered on
import: it defines ``ADAPTER`` (one :class:`ArchitectureAdapter`) or ``ADAPTERS`` (several).
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from prefix_hooks.families.base import (
    ArchitectureAdapter,
    AttentionSite,
    CurrentState,
    ForwardCall,
    ModelDims,
    PositionInputs,
    SpliceSource,
)

__all__ = [
    "ArchitectureAdapter",
    "AttentionSite",
    "CurrentState",
    "ForwardCall",
    "ModelDims",
    "PositionInputs",
    "SpliceSource",
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


def _register_family_modules() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        adapters = getattr(module, "ADAPTERS", None) or (module.ADAPTER,)
        for adapter in adapters:
            register_family(adapter)


_register_family_modules()
