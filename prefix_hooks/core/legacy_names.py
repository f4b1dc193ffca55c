"""Module names from before transformers 5, so configs and checkpoints written for them still apply.

transformers 5 renamed the modules of some families: a ViT's
``vit.encoder.layer.0.attention.attention.query`` is now ``vit.layers.0.attention.q_proj``. The
renamings it applies to old checkpoints are listed per family in
``transformers.conversion_mapping``. PEFT configs and adapters from before the rename name
the old modules (``target_modules=["query", "value"]``, keys ``...attention.attention.query.lora_A.weight``);
PEFT 0.21 matches neither on a transformers 5 model (``NoMatchingPeftModuleError``).

Here every module gets, besides its name, its *legacy name*: the model's own renamings run
backwards, kept only when running them forwards gives the module's name again (so a legacy
name is exactly a name transformers would load into that module). Only plain renamings are
used; a family whose conversion merges or splits tensors (MoE experts) has no legacy names
for those tensors. A model without renamings (most families) gets an empty mapping.

Nothing here mutates the model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from torch import nn
from transformers import PreTrainedModel

__all__ = ["current_keys", "legacy_module_names", "spellings"]

T = TypeVar("T")


def _renamings(model: nn.Module) -> list[Any]:
    """The model's plain ``WeightRenaming``s, in transformers' load order; [] when it has none."""
    if not isinstance(model, PreTrainedModel):
        return []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4.x: nothing was renamed
        return []
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    return [transform for transform in transforms if type(transform) is WeightRenaming]


def _apply(name: str, renamings: list[Any]) -> str:
    for renaming in renamings:  # each may fire; later ones see the earlier results (transformers' order)
        name, _ = renaming.rename_source_key(name)
    return name


def legacy_module_names(model: nn.Module) -> dict[str, str]:
    """``{qualified module name: its name before transformers 5}`` for the modules that were renamed.

    E.g. ``{"vit.layers.0.attention.q_proj": "vit.encoder.layer.0.attention.attention.query", ...}``
    for a ViT; ``{}`` for a family transformers did not rename.
    """
    renamings = _renamings(model)
    if not renamings:
        return {}
    backwards = [renaming.reverse_transform() for renaming in reversed(renamings)]
    legacy: dict[str, str] = {}
    for name, _module in model.named_modules():
        if not name:
            continue
        old = _apply(name, backwards)
        if old != name and _apply(old, renamings) == name:  # the round trip proves the old name loads here
            legacy[name] = old
    return legacy


def spellings(name: str, legacy: Mapping[str, str]) -> tuple[str, ...]:
    """``(name,)``, or ``(name, legacy name)`` when the module was renamed: the names a config may use."""
    old = legacy.get(name)
    return (name,) if old is None else (name, old)


def current_keys(
    model: nn.Module, tensors: Mapping[str, T], expected: Collection[str], prefix: str = "base_model.model."
) -> dict[str, T]:
    """``tensors`` with keys written for the legacy module names renamed to ``expected`` ones.

    A key is renamed only when it is not expected, starts with ``prefix`` (PEFT's key prefix),
    and transformers' renamings turn it into an expected key that is not also given; every
    other key is kept as it is (so a wrong key is still reported by the caller's check).
    """
    renamings = _renamings(model)
    if not renamings:
        return dict(tensors)
    out: dict[str, T] = {}
    for key, value in tensors.items():
        if key not in expected and key.startswith(prefix):
            renamed = prefix + _apply(key[len(prefix) :], renamings)
            if renamed in expected and renamed not in tensors:
                key = renamed
        out[key] = value
    return out
