"""What the codecs of the methods that adapt chosen modules (LoRA, (IA)^3) share: the config PEFT
reads back to the same targets, and the checks before a load.

PEFT's ``adapter_config.json`` of such a method says which modules it adapts, and PEFT must select
the same ones. Two of our rules select more than PEFT's: a transformers ``Conv1D`` target needs no
``fan_in_fan_out=True`` here (we recognise the type), and a module transformers 5 renamed also
matches by its old name (:mod:`prefix_hooks.core.legacy_names`). :func:`peft_config` writes what
PEFT needs in both cases. (No codec: this module registers nothing.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.checkpoint.codec import SavedAdapter
from prefix_hooks.checkpoint.state_dicts import some
from prefix_hooks.core.config import AdapterConfig

Selection = dict[str, list[str]]
"""Config field -> the qualified names of the modules it selected (``{"target_modules": [...]}``)."""


def peft_config(
    config: AdapterConfig, targets: Iterable[nn.Module], selected: Selection, select: Callable[[bool], Selection]
) -> dict[str, Any]:
    """``config.to_json_dict()`` with what PEFT needs to select the same ``targets``.

    ``fan_in_fan_out`` is written True when a target is a transformers ``Conv1D``, as PEFT writes
    it (PEFT sets the flag for such targets; ours recognises ``Conv1D`` by type). When the config
    selects some module only by a name from before transformers 5 (PEFT matches current names
    only), the fields of ``selected`` are written as the full current names.

    Args:
        targets: the adapted modules (the originals).
        selected: what the adapter selected, by config field.
        select: ``select(legacy_names)``: the selection again (raising ``ValueError`` when nothing matches).
    """
    out = config.to_json_dict()
    out["fan_in_fan_out"] = bool(out["fan_in_fan_out"]) or any(isinstance(module, Conv1D) for module in targets)
    try:
        plain: Selection | None = select(False)
    except ValueError:  # nothing matches without the old names
        plain = None
    if plain != selected:
        out.update({field: sorted(names) for field, names in selected.items()})
    return out


def check_loadable(config: object, config_type: type[AdapterConfig], saved: SavedAdapter, method: str) -> None:
    """Raise unless ``config`` is a ``config_type`` and ``saved`` has no extra tensors (the config and
    PEFT's tensors rebuild such an adapter exactly).

    Raises:
        TypeError: ``config`` is of another type.
        ValueError: the extra file holds tensors; ``method`` names the method (``"LoRA"``).
    """
    if not isinstance(config, config_type):
        raise TypeError(f"the {method} codec loads a {config_type.__name__}, got {type(config).__name__}")
    if saved.extra:
        raise ValueError(f"{method} checkpoints have no extra tensors, but the extra file holds {some(sorted(saved.extra))}")
