"""The architecture adapters, one module per model family, registered on import.

``supported()`` lists the model types that work; ``register_family`` adds an adapter
for an architecture of your own (see :class:`ArchitectureAdapter` for the interface).
The interface and the registry live in :mod:`prefix_hooks.prefix.architecture`; this
package only fills the registry.

Every module in this package not starting with ``_`` is a family module: it defines
``ADAPTER`` (one :class:`ArchitectureAdapter`) or ``ADAPTERS`` (several).
"""

from __future__ import annotations

import importlib
import pkgutil

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.prefix.architecture import (
    ArchitectureAdapter,
    AttentionSite,
    CurrentState,
    ModelDims,
    PositionInputs,
    SpliceSource,
    UnsupportedModelError,
    adapter_for,
    register_family,
    supported,
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


def _register_family_modules() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        adapters = getattr(module, "ADAPTERS", None) or (module.ADAPTER,)
        for adapter in adapters:
            register_family(adapter)


_register_family_modules()
