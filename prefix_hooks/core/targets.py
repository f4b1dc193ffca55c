"""Which modules of a model a weight-adapting method (LoRA, (IA)^3) adapts, and which it saves as copies.

The rules are PEFT 0.21's, so a config selects the same modules here as in
``peft.get_peft_model``; each method adds its own on top (LoRA's ``layers_to_transform``,
(IA)^3's feed-forward modules):

* ``target_modules`` as a list: a module is a target when its qualified name equals an
  entry or ends with ``"." + entry``; a string is a regular expression that must match the
  whole qualified name; ``"all-linear"`` means every ``nn.Linear`` / transformers ``Conv1D``
  except the output head; ``None`` means the method's family default (:func:`family_default`).
* ``exclude_modules`` (same matching) and every module inside a module to save are never targets.
* An adapter layer already in the model (another attachment's) counts as the module it wraps;
  its insides are never candidates. Layers are recognised by what they hold (``base_layer`` and
  ``lora_A``; ``original_module`` and ``modules_to_save``), so this module imports no method.
* Beyond PEFT: a module transformers 5 renamed also matches by its old name
  (:mod:`prefix_hooks.core.legacy_names`), so configs written for transformers 4 still select it.

Selection only reads the model; nothing is mutated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.config import TaskType
from prefix_hooks.core.legacy_names import legacy_module_names, spellings

ALL_LINEAR = "all-linear"
"""``target_modules`` shorthand (case-insensitive, as PEFT): every Linear / Conv1D but the output head."""

TASK_MODULES_TO_SAVE: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}
"""Heads PEFT's task models add to ``modules_to_save`` (each only where the model has it)."""

_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
_EXAMPLES_IN_ERRORS = 6


@dataclass(frozen=True)
class AdaptableModules:
    """What one method can adapt, for selection and its error messages.

    Attributes:
        method: the method as messages name it (``"LoRA"``).
        action: what it does to a target (``"wrap"``: "LoRA cannot wrap ...").
        types: the module types it adapts (subclasses included).
        type_names: ``types`` as messages list them.
    """

    method: str
    action: str
    types: tuple[type[nn.Module], ...]
    type_names: str


class SelectionFields(Protocol):
    """The config fields :func:`select_modules` reads besides the targets (``LoraConfig``'s, ``IA3Config``'s)."""

    @property
    def exclude_modules(self) -> Collection[str] | str | None: ...

    @property
    def modules_to_save(self) -> Collection[str] | None: ...

    @property
    def task_type(self) -> TaskType | str | None: ...


@dataclass(frozen=True)
class Selected:
    """One selected target.

    Attributes:
        name: its qualified name in ``named_modules()``.
        spellings: ``name`` and, for a module transformers 5 renamed, its old name.
        module: the original module (inside the adapter layer when one wraps that name).
    """

    name: str
    spellings: tuple[str, ...]
    module: nn.Module


def task_heads(task_type: TaskType | str | None) -> tuple[str, ...]:
    """The heads PEFT's task model for ``task_type`` trains implicitly; they may match nothing."""
    if task_type is None:
        return ()
    return TASK_MODULES_TO_SAVE.get(TaskType(task_type), ())


def family_default(model: nn.Module, table: Mapping[str, list[str] | str], field: str) -> list[str] | str:
    """``table[model.config.model_type]``: the default of config field ``field`` for ``model``'s family.

    Raises:
        ValueError: the model has no ``config.model_type`` or ``table`` has no entry for it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = table.get(model_type) if isinstance(model_type, str) else None
    if default is None:
        shorthand = f", or {ALL_LINEAR!r}" if field == "target_modules" else ""
        raise ValueError(
            f"{field}=None but model_type={model_type!r} ({type(model).__name__}) has no default {field}; "
            f"pass {field}: a list of module names or a regex{shorthand}"
        )
    return default


def matches_names(name: str, names: Iterable[str]) -> bool:
    """``name`` equals an entry of ``names`` or ends with ``"." + entry``."""
    return any(name == key or name.endswith("." + key) for key in names)


def _wrapped_base(module: nn.Module) -> nn.Module | None:
    """The original module inside an adapter layer (a module with ``base_layer`` and ``lora_A``)."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and hasattr(module, "lora_A") else None


def _original(module: nn.Module) -> nn.Module:
    """``module``, or the original an adapter layer wraps."""
    base = _wrapped_base(module)
    return module if base is None else base


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


def _inside(name: str, saved: str) -> bool:
    """``name`` is the module ``saved`` names (exact or dotted suffix) or lies inside it."""
    return name == saved or name.startswith(saved + ".") or name.endswith("." + saved) or f".{saved}." in name


def _all_linear_names(model: nn.Module) -> set[str]:
    """Every Linear / Conv1D but a transformers model's output head. (PEFT also drops a SEQ_CLS
    model's ``classifier`` / ``score`` here; that task saves them, which excludes them anyway.)"""
    names = {name for name, module in _candidates(model) if isinstance(_original(module), _LINEAR_TYPES)}
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    if head is not None:
        names -= {name for name, module in model.named_modules() if module is head}
    return names


def select_modules(
    model: nn.Module,
    targets: Collection[str] | str,
    config: SelectionFields,
    adaptable: AdaptableModules,
    *,
    described: str,
    in_layers: Callable[[str], bool] | None = None,
    filters: Sequence[str] = (),
    legacy_names: bool = True,
) -> list[Selected]:
    """The modules of ``model`` that ``targets`` selects, in ``named_modules()`` order (rules above).

    Args:
        model: the model (as it is without adapters, or with adapter layers that count as their originals).
        targets: ``target_modules`` with the family default filled in: names, a regex or ``"all-linear"``.
        config: its ``exclude_modules`` and modules to save (``modules_to_save`` and the task's
            heads, :func:`task_heads`) are never targets, nor is anything inside a module to save.
        adaptable: what the method can adapt; another matched type raises.
        described: ``targets`` as the messages name it (e.g. ``"target_modules=['q_proj']"``).
        in_layers: whether a name matched through a list entry lies in the wanted layers (LoRA's
            ``layers_to_transform``); an entry equal to the full name is kept whatever its layer, as PEFT.
        filters: the method's own filters as messages name them (``"layers_to_transform=[0]"``).
        legacy_names: also match a module renamed by transformers 5 by its old name.

    Raises:
        ValueError: nothing matches, or a match is not one of ``adaptable.types``; the message
            names the offending value.
    """
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = _all_linear_names(model)
    exclude = config.exclude_modules
    saved = [*(config.modules_to_save or []), *task_heads(config.task_type)]

    def is_excluded(name: str) -> bool:
        if isinstance(exclude, str):
            return re.fullmatch(exclude, name) is not None
        return bool(exclude) and matches_names(name, exclude or ())

    def is_target(name: str) -> bool:
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True  # named in full: PEFT keeps it whatever its layer
        return matches_names(name, targets) and (in_layers is None or in_layers(name))

    legacy = legacy_module_names(model) if legacy_names else {}
    selected: list[Selected] = []
    excluded = 0
    for name, module in _candidates(model):
        names = spellings(name, legacy)  # the module's name, and its name before transformers 5 if renamed
        if any(is_excluded(n) or any(_inside(n, key) for key in saved) for n in names):
            excluded += 1
        elif any(is_target(n) for n in names):
            selected.append(Selected(name, names, _original(module)))

    method, action = adaptable.method, adaptable.action
    for target in selected:
        if not isinstance(target.module, adaptable.types):
            raise ValueError(
                f"{described} matches {target.name!r} ({type(target.module).__name__}), which {method} cannot "
                f"{action}; supported module types: {adaptable.type_names}. Narrow target_modules to those"
            )
    if not selected:
        examples = [name for name, module in _candidates(model) if isinstance(module, adaptable.types)]
        shown = [*filters, *([f"exclude_modules={exclude!r} / modules_to_save={saved!r}"] if excluded else [])]
        filtered = f" (with {', '.join(shown)})" if shown else ""
        raise ValueError(
            f"{described}{filtered} matches no module of {type(model).__name__}; modules {method} can {action} "
            f"include {', '.join(examples[:_EXAMPLES_IN_ERRORS]) or 'none'}"
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
        optional: names that may match nothing, e.g. :func:`task_heads`.

    Raises:
        ValueError: an entry of ``names`` that is not in ``optional`` matches no module.
    """
    optional = list(optional)
    required = [name for name in dict.fromkeys(names) if name not in optional]
    wanted = list(dict.fromkeys([*required, *optional]))
    candidates = [name for name, _module in _candidates(model)]
    selected: list[str] = []
    for name in candidates:
        if matches_names(name, wanted) and not any(name.startswith(parent + ".") for parent in selected):
            selected.append(name)
    missing = [key for key in required if not any(matches_names(name, [key]) for name in candidates)]
    if missing:
        raise ValueError(
            f"modules_to_save entries {missing!r} match no module of {type(model).__name__}; give a module's "
            "qualified name or its last components, e.g. 'classifier'"
        )
    return selected
