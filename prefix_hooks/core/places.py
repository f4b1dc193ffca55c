"""Where a selected module sits in its model, so an adapter built now can swap it later.

An adapter selects its modules when it is built and swaps them when it is attached, maybe
after the model changed. A :class:`Place` keeps the module's qualified name split into the
path of its parent and its key in ``parent._modules``, and the module itself; :func:`parent_now`
walks that path again and says clearly why it cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Place:
    """Where a module sits: ``model.<parent_path>._modules[child_name]``, and the module itself.

    Attributes:
        name: the qualified name (``"model.layers.0.self_attn.q_proj"``).
        parent_path: the parent's name split at dots (``("model", "layers", "0", "self_attn")``).
        child_name: the key in the parent's ``_modules`` (``"q_proj"``).
        original: the module found there when the place was recorded.
    """

    name: str
    parent_path: tuple[str, ...]
    child_name: str
    original: nn.Module

    @classmethod
    def of(cls, name: str, original: nn.Module) -> Place:
        """The place of ``original``, found at ``name``."""
        *parent, child = name.split(".")
        return cls(name, tuple(parent), child, original)


def parent_now(model: nn.Module, place: Place, replaced: Mapping[int, str] | None = None) -> nn.Module:
    """The module holding ``place`` in ``model`` now (whatever it holds there).

    Args:
        replaced: ``id(module)`` -> name of the modules other adapters swapped in; the path
            must not run through one (their insides are not the model's).

    Raises:
        RuntimeError: a module on the path is gone, or is one of ``replaced``.
    """
    parent = model
    for depth, key in enumerate(place.parent_path):
        child = parent._modules.get(key)
        if child is None:
            raise RuntimeError(
                f"{place.name!r}: the model has no module {'.'.join(place.parent_path[: depth + 1])!r} any more; "
                "build the adapter again for the model as it is now"
            )
        if replaced and id(child) in replaced:
            raise RuntimeError(
                f"{place.name!r} lies inside {replaced[id(child)]!r}, which another adapter replaced (as a "
                "target or a module to save); the two adapters cannot be attached together"
            )
        parent = child
    return parent
