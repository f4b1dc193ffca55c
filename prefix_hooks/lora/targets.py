"""Which modules of a model get a LoRA adapter: PEFT 0.21's rules (:mod:`prefix_hooks.core.targets`)
plus ``layers_to_transform``, and LoRA's family defaults.

``layers_to_transform`` keeps only list matches in the given layers (an entry equal to the
full qualified name is kept whatever its layer, as in PEFT). Selection is checked against
PEFT in ``tests/lora/test_lora_targets.py``; it only reads the model. :func:`select_modules_to_save`
and :data:`TASK_MODULES_TO_SAVE` are the core's, importable from here as well.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.targets import (
    TASK_MODULES_TO_SAVE,
    AdaptableModules,
    family_default,
    select_modules,
    select_modules_to_save,
    task_heads,
)
from prefix_hooks.lora.config import LoraConfig

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "SUPPORTED_MODULE_TYPES",
    "TASK_MODULES_TO_SAVE",
    "default_target_modules",
    "layer_index",
    "select_modules_to_save",
    "select_targets",
    "task_modules_to_save",
]

SUPPORTED_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d)
"""Module types a LoRA layer can wrap (subclasses included, e.g. bitsandbytes' quantised linears)."""

_ADAPTABLE = AdaptableModules(
    "LoRA", "wrap", SUPPORTED_MODULE_TYPES, "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d"
)

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    # PEFT 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (same values) ...
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # ... and the families PEFT has no default for: the query and value projections.
    "mbart": ["q_proj", "v_proj"],
    "whisper": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],  # fused query/key/value projection
    "distilbert": ["q_lin", "v_lin"],
    "modernbert": ["Wqkv"],  # fused query/key/value projection
    "vit": ["q_proj", "v_proj"],  # transformers 5 names (4.x called them query / value)
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "llava": r".*language_model\..*\.(q_proj|v_proj)",  # the text tower only, not the vision tower
}
"""``config.model_type`` -> default ``target_modules`` (a list of names, or a full-match regex)."""


def task_modules_to_save(config: LoraConfig) -> tuple[str, ...]:
    """The heads ``config.task_type`` saves implicitly, as PEFT's task models do; may match nothing."""
    return task_heads(config.task_type)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The family default ``target_modules`` of ``model`` (by ``model.config.model_type``).

    Raises:
        ValueError: the model has no ``config.model_type`` or the family has no default.
    """
    return family_default(model, DEFAULT_TARGET_MODULES, "target_modules")


def layer_index(name: str, layers_pattern: Sequence[str] | str | None = None) -> int | None:
    """The layer index in a qualified module name, found as PEFT finds it.

    With ``layers_pattern`` (a container name or regex, or a list tried in order): the number
    right after the first component sequence matching a pattern (``model.layers.3.mlp`` ->
    3 for ``"layers"``). Without: the first all-digit component at depth >= 2 that is not the
    last component (``transformer.h.3.attn.c_attn`` -> 3; ``h.3.attn`` -> None).
    """
    if not layers_pattern:
        match = re.match(r"(?:[^.]+\.)+?[^.]+\.(?P<index>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            # `??`: try the pattern at the start first, then ever later components.
            match = re.match(rf"(?:.*?\.)??(?:{pattern})\.(?P<index>\d+)\.", name)
            if match is not None:
                break
    return None if match is None else int(match.group("index"))


def _describe_targets(config: LoraConfig, targets: Collection[str] | str) -> str:
    if config.target_modules is None:
        return f"target_modules=None (the family default {targets!r})"
    shown = targets if isinstance(targets, str) else sorted(targets)
    return f"target_modules={shown!r}"


def select_targets(model: nn.Module, config: LoraConfig, *, legacy_names: bool = True) -> list[str]:
    """Qualified names of the modules of ``model`` that get an adapter, in ``named_modules()`` order.

    An adapter layer already in the model (from another attachment) counts as the module it
    wraps; its insides are never targets. With ``legacy_names`` a module renamed by
    transformers 5 also matches by its old name (:mod:`prefix_hooks.core.legacy_names`), so
    ``["query", "value"]`` selects a ViT's ``q_proj`` / ``v_proj``.

    Raises:
        ValueError: no module matches; a matched module is not one of
            :data:`SUPPORTED_MODULE_TYPES`; ``target_modules=None`` and the family has no
            default. Messages name the offending value.
    """
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    described = _describe_targets(config, targets)
    wanted = config.layers_to_transform
    uses_layers = wanted is not None and wanted != []
    if isinstance(targets, str) and uses_layers:
        raise ValueError(
            f"layers_to_transform={wanted!r} needs a list of target names but {described} "
            "is a regex; pass target_modules as a list"
        )

    def in_layers(name: str) -> bool:
        index = layer_index(name, config.layers_pattern)
        return index is not None and (index == wanted if isinstance(wanted, int) else index in (wanted or []))

    filters = [f"layers_to_transform={wanted!r}"] if uses_layers else []
    if config.layers_pattern is not None:
        filters.append(f"layers_pattern={config.layers_pattern!r}")
    selected = select_modules(
        model,
        targets,
        config,
        _ADAPTABLE,
        described=described,
        in_layers=in_layers if uses_layers else None,
        filters=filters,
        legacy_names=legacy_names,
    )
    return [target.name for target in selected]
