"""The config fields of the methods that adapt chosen modules (LoRA, (IA)^3), checked and normalised once;
and :func:`require_config`, the check that a handle got its own config class.

``target_modules``, ``exclude_modules``, ``modules_to_save``, ``task_type`` and ``peft_type`` mean
the same in both configs (PEFT's meanings; matching rules in :mod:`prefix_hooks.core.targets`).
Every check raises ``ValueError`` naming the field, its value and what is accepted, and returns
the normalised value without storing it, so a config checks every field before it sets any.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, TypeGuard, TypeVar

from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType
from prefix_hooks.core.targets import ALL_LINEAR

C = TypeVar("C", bound=AdapterConfig)


class ModuleFields(Protocol):
    """The fields :func:`checked_module_fields` reads (``LoraConfig``'s and ``IA3Config``'s)."""

    @property
    def target_modules(self) -> object: ...

    @property
    def exclude_modules(self) -> object: ...

    @property
    def modules_to_save(self) -> object: ...

    @property
    def task_type(self) -> object: ...

    @property
    def peft_type(self) -> object: ...


def require_config(config: object, cls: type[C]) -> C:
    """``config``, which a method's handle needs as its ``cls`` (our config class, not PEFT's).

    Raises:
        TypeError: naming the type given and how a PEFT config converts.
    """
    if not isinstance(config, cls):
        kind = f"{type(config).__module__}.{type(config).__qualname__}"
        name = f"prefix_hooks.{cls.__name__}"
        raise TypeError(
            f"config must be a {name}, got {kind}; a PEFT config converts with {name}(**{{k: v for k, v in "
            f"peft_config.to_dict().items() if k in {name}.__dataclass_fields__}})"
        )
    return config


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_regex(name: str, pattern: str) -> None:
    """Raise unless ``pattern`` compiles."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression ({err})") from None


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted; expected True or False")


def module_names(name: str, value: object, *, allow_empty: bool) -> set[str]:
    """A list/set/tuple of non-empty module names as a set."""
    if not isinstance(value, (list, set, tuple, frozenset)) or not all(
        isinstance(item, str) and item for item in value
    ):
        raise ValueError(
            f"{name}={value!r} is not accepted; expected a list of module names (exact name or dotted "
            "suffix), a regular expression string, or None"
        )
    if not value and not allow_empty:
        raise ValueError(f"{name}={value!r} selects no module; give at least one name, a regex, or None")
    return set(value)


def module_filter(name: str, value: object, *, allow_empty: bool) -> set[str] | str | None:
    """A module selection (``target_modules``, ``exclude_modules``, ...): None, a regex string or a set of names.

    ``"all-linear"`` is accepted for ``target_modules`` only.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            if name != "target_modules":
                raise ValueError(f"{name}={value!r} is not accepted; {ALL_LINEAR!r} is a target_modules shorthand")
            return value
        if not value:
            raise ValueError(f"{name}='' is not accepted; expected a non-empty regular expression")
        check_regex(name, value)
        return value
    return module_names(name, value, allow_empty=allow_empty)


def checked_module_fields(config: ModuleFields, peft_type: PeftType, bools: Sequence[str]) -> dict[str, Any]:
    """Check the shared fields of ``config`` and the flags named in ``bools``.

    Args:
        config: a ``LoraConfig`` or ``IA3Config`` in its ``__post_init__``.
        peft_type: the only ``peft_type`` the config accepts.
        bools: the names of the config's fields that must be ``True`` or ``False``.

    Returns:
        The normalised values by field name: ``target_modules`` / ``exclude_modules`` as a set,
        a regex or None; ``modules_to_save`` as a list in the user's order without repeats (a
        set sorted); ``task_type`` and ``peft_type`` as enums.
    """
    target_modules = module_filter("target_modules", config.target_modules, allow_empty=False)
    exclude_modules = module_filter("exclude_modules", config.exclude_modules, allow_empty=True)
    for name in bools:
        check_bool(name, getattr(config, name))
    value = config.modules_to_save
    modules_to_save = None
    if value is not None:
        if isinstance(value, str):
            raise ValueError(f"modules_to_save={value!r} is not accepted; expected a list of module names")
        names = module_names("modules_to_save", value, allow_empty=True)
        # A list keeps the user's order (duplicates dropped); a set has none, so sort it.
        ordered = value if isinstance(value, (list, tuple)) else sorted(names)
        modules_to_save = list(dict.fromkeys(ordered))
    task_type = _checked_task_type(config.task_type)
    if config.peft_type != peft_type:
        raise ValueError(f"peft_type={config.peft_type!r} is not accepted; expected {peft_type.value!r}")
    return {
        "target_modules": target_modules,
        "exclude_modules": exclude_modules,
        "modules_to_save": modules_to_save,
        "task_type": task_type,
        "peft_type": peft_type,
    }


def _checked_task_type(value: object) -> TaskType | None:
    if value is None:
        return None
    try:
        return TaskType(value)
    except ValueError:
        accepted = ", ".join(t.value for t in TaskType)
        raise ValueError(f"task_type={value!r} is not accepted; expected one of {accepted} or None") from None


