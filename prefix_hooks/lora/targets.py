"""Which modules of a model get a LoRA adapter, and which are saved as trainable copies.

The rules are PEFT 0.21's, so a config selects the same modules here as in
``peft.get_peft_model`` (checked against PEFT in ``tests/lora/test_lora_targets.py``):

* ``target_modules`` as a list: a module is a target when its qualified name equals an
  entry or ends with ``"." + entry``; a string is a regular expression that must match the
  whole qualified name; ``"all-linear"`` means every ``nn.Linear`` / transformers ``Conv1D``
  except the output head; ``None`` means the family default (:data:`DEFAULT_TARGET_MODULES`).
* ``exclude_modules`` (same matching) and every module inside a ``modules_to_save`` module
  are never targets.
* ``layers_to_transform`` keeps only list matches in the given layers (an entry equal to the
  full qualified name is kept whatever its layer, as in PEFT).
* Beyond PEFT: a module transformers 5 renamed also matches by its old name
  (:mod:`prefix_hooks.core.legacy_names`), so configs written for transformers 4 still select it.

Selection only reads the model; nothing is mutated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.config import TaskType
from prefix_hooks.core.legacy_names import legacy_module_names, spellings
from prefix_hooks.lora.config import ALL_LINEAR, LoraConfig

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

_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

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

TASK_MODULES_TO_SAVE: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}
"""Heads PEFT's task models add to ``modules_to_save`` (each only where the model has it)."""

_EXAMPLES_IN_ERRORS = 6


def task_modules_to_save(config: LoraConfig) -> tuple[str, ...]:
    """The heads ``config.task_type`` saves implicitly, as PEFT's task models do; may match nothing."""
    if config.task_type is None:
        return ()
    return TASK_MODULES_TO_SAVE.get(TaskType(config.task_type), ())


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The family default ``target_modules`` of ``model`` (by ``model.config.model_type``).

    Raises:
        ValueError: the model has no ``config.model_type`` or the family has no default.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULT_TARGET_MODULES.get(model_type) if isinstance(model_type, str) else None
    if default is None:
        raise ValueError(
            f"target_modules=None but model_type={model_type!r} ({type(model).__name__}) has no default target "
            "modules; pass target_modules: a list of module names, a regex, or 'all-linear'"
        )
    return default


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


def _wrapped_base(module: nn.Module) -> nn.Module | None:
    """The original module inside an adapter layer (a module with ``base_layer`` and ``lora_A``)."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and hasattr(module, "lora_A") else None


def _is_wrapper(module: nn.Module) -> bool:
    """An adapter layer, or a modules-to-save wrapper (``original_module`` + ``modules_to_save``)."""
    if _wrapped_base(module) is not None:
        return True
    return isinstance(getattr(module, "original_module", None), nn.Module) and hasattr(module, "modules_to_save")


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the root and without the insides of adapter wrappers."""
    inside: str | None = None  # prefix of the wrapper being skipped; pre-order keeps its insides together
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = name + "." if _is_wrapper(module) else None
        yield name, module


def _effective_type(module: nn.Module) -> nn.Module:
    base = _wrapped_base(module)
    return module if base is None else base


def _matches_names(name: str, names: Iterable[str]) -> bool:
    return any(name == key or name.endswith("." + key) for key in names)


def _inside(name: str, saved: str) -> bool:
    """``name`` is the module ``saved`` names (exact or dotted suffix) or lies inside it."""
    return name == saved or name.startswith(saved + ".") or name.endswith("." + saved) or f".{saved}." in name


def _all_linear_names(model: nn.Module) -> set[str]:
    """Every Linear / Conv1D but a transformers model's output head. (PEFT also drops a SEQ_CLS
    model's ``classifier`` / ``score`` here; that task saves them, which excludes them anyway.)"""
    names = {name for name, module in _candidates(model) if isinstance(_effective_type(module), _LINEAR_TYPES)}
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    if head is not None:
        names -= {name for name, module in model.named_modules() if module is head}
    return names


def _describe_targets(config: LoraConfig, targets: set[str] | list[str] | str) -> str:
    if config.target_modules is None:
        return f"target_modules=None (the family default {targets!r})"
    shown = sorted(targets) if isinstance(targets, (set, list)) else targets
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
    requested = config.target_modules if config.target_modules is not None else default_target_modules(model)
    targets: set[str] | list[str] | str = set(requested) if isinstance(requested, tuple) else requested
    described = _describe_targets(config, targets)
    uses_layers = config.layers_to_transform is not None and config.layers_to_transform != []
    if isinstance(targets, str) and uses_layers:
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} needs a list of target names but {described} "
            "is a regex; pass target_modules as a list"
        )
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        targets = _all_linear_names(model)
    saved = [*(config.modules_to_save or []), *task_modules_to_save(config)]
    exclude = config.exclude_modules

    def is_excluded(name: str) -> bool:
        if isinstance(exclude, str):
            return re.fullmatch(exclude, name) is not None
        return bool(exclude) and _matches_names(name, exclude or ())

    def is_target(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True  # named in full: PEFT keeps it whatever its layer
        found = _matches_names(name, targets)
        if found and uses_layers:
            index = layer_index(name, config.layers_pattern)
            wanted = config.layers_to_transform
            found = index is not None and (index == wanted if isinstance(wanted, int) else index in (wanted or []))
        return found

    legacy = legacy_module_names(model) if legacy_names else {}
    selected: list[str] = []
    excluded = 0
    for name, _module in _candidates(model):
        names = spellings(name, legacy)  # the module's name, and its name before transformers 5 if renamed
        if any(is_excluded(n) or any(_inside(n, key) for key in saved) for n in names):
            excluded += 1
            continue
        if any(is_target(n) for n in names):
            selected.append(name)

    modules = dict(model.named_modules())
    for name in selected:
        module = _effective_type(modules[name])
        if not isinstance(module, SUPPORTED_MODULE_TYPES):
            raise ValueError(
                f"{described} matches {name!r} ({type(module).__name__}), which LoRA cannot wrap; supported module "
                "types: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d. Narrow target_modules to those"
            )
    if not selected:
        examples = [name for name, module in _candidates(model) if isinstance(module, SUPPORTED_MODULE_TYPES)]
        filters = []
        if uses_layers:
            filters.append(f"layers_to_transform={config.layers_to_transform!r}")
        if config.layers_pattern is not None:
            filters.append(f"layers_pattern={config.layers_pattern!r}")
        if excluded:
            filters.append(f"exclude_modules={exclude!r} / modules_to_save={saved!r}")
        filtered = f" (with {', '.join(filters)})" if filters else ""
        raise ValueError(
            f"{described}{filtered} matches no module of {type(model).__name__}; modules LoRA can wrap include "
            f"{', '.join(examples[:_EXAMPLES_IN_ERRORS]) or 'none'}"
            + (", ..." if len(examples) > _EXAMPLES_IN_ERRORS else "")
        )
    return selected


def select_modules_to_save(model: nn.Module, names: Iterable[str], *, optional: Iterable[str] = ()) -> list[str]:
    """Qualified names of the modules to train as full copies, in ``named_modules()`` order.

    A module is selected when its qualified name equals an entry of ``names`` or ``optional``
    or ends with ``"." + entry``. (PEFT tests a bare ``endswith``, so its ``"classifier"``
    also catches distilbert's ``pre_classifier``; the dotted rule here does not.) Modules inside
    an already selected module are left out (its copy contains them).

    Args:
        names: names the user asked for; each must match a module unless it is also in
            ``optional``: PEFT writes the task heads into a saved config's ``modules_to_save``
            (``["classifier", "score"]`` for ``SEQ_CLS``), and there ``score`` matches nothing
            on a bert model, as when PEFT loads that config.
        optional: names that may match nothing, e.g. :func:`task_modules_to_save`.

    Raises:
        ValueError: an entry of ``names`` that is not in ``optional`` matches no module.
    """
    optional = list(optional)
    required = [name for name in dict.fromkeys(names) if name not in optional]
    wanted = list(dict.fromkeys([*required, *optional]))
    candidates = [name for name, _module in _candidates(model)]
    selected: list[str] = []
    for name in candidates:
        if _matches_names(name, wanted) and not any(name.startswith(parent + ".") for parent in selected):
            selected.append(name)
    missing = [key for key in required if not any(_matches_names(name, [key]) for name in candidates)]
    if missing:
        raise ValueError(
            f"modules_to_save entries {missing!r} match no module of {type(model).__name__}; give a module's "
            "qualified name or its last components, e.g. 'classifier'"
        )
    return selected
