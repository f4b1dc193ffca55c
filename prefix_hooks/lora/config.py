"""Configuration of LoRA, with the field names, meanings and defaults of PEFT's ``LoraConfig``.

A LoRA adapter replaces a frozen weight ``W`` (out, in) by ``W + scaling * B @ A`` with
``A`` (r, in), ``B`` (out, r) and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``), Hu et al. (2021). The config says which modules get an adapter
(see :mod:`prefix_hooks.lora.targets`) and with which rank and alpha.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType

ALL_LINEAR = "all-linear"
"""``target_modules`` shorthand (case-insensitive, as PEFT): every Linear / Conv1D but the output head."""

BIAS_MODES = ("none", "all", "lora_only")
LORA_PEFT_TYPE = PeftType.LORA


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression ({err})") from None


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted; expected True or False")


def _names(name: str, value: object, *, allow_empty: bool) -> set[str]:
    """A list/set/tuple of non-empty module names as a set; raise naming ``value`` otherwise."""
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


def _module_filter(name: str, value: object, *, allow_empty: bool) -> set[str] | str | None:
    """Validate ``target_modules`` / ``exclude_modules``: None, a regex string or a collection of names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            if name != "target_modules":
                raise ValueError(f"{name}={value!r} is not accepted; {ALL_LINEAR!r} is a target_modules shorthand")
            return value
        if not value:
            raise ValueError(f"{name}='' is not accepted; expected a non-empty regular expression")
        _check_regex(name, value)
        return value
    return _names(name, value, allow_empty=allow_empty)


def _pattern_dict(name: str, value: object, *, integer: bool) -> dict[str, Any]:
    accepted = "positive ints" if integer else "positive numbers"
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={value!r} is not accepted; expected a dict of module-name regex -> {accepted}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} key {key!r} is not accepted; expected a non-empty module-name regex")
        _check_regex(f"{name} key", key)
        valid = _is_int(item) if integer else _is_number(item)
        if not valid or item <= 0 or (not integer and not math.isfinite(item)):
            raise ValueError(f"{name}[{key!r}]={item!r} is not accepted; expected {accepted}")
    return dict(value)


def _pattern_key(keys: list[str], module_name: str) -> str | None:
    """First key of ``keys`` that matches the end of ``module_name`` (PEFT's rank/alpha pattern rule)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021): ``h = W x + scaling * B(A(dropout(x)))`` on each target module.

    Field names, meanings and defaults are PEFT 0.21's, so a config converts to and from a
    PEFT ``adapter_config.json`` (:meth:`to_dict`).

    Args:
        r: rank of ``A`` (r, in) and ``B`` (out, r); a positive int.
        lora_alpha: numerator of the scaling; a positive number.
        lora_dropout: dropout probability on the adapter's input, ``0 <= p < 1``.
        target_modules: which modules get an adapter. A list (or set/tuple) of names, each
            matching a module whose qualified name equals it or ends with ``"." + name``; a
            string, a regular expression that must match the whole qualified name;
            ``"all-linear"``, every ``nn.Linear`` / transformers ``Conv1D`` except the output
            head; ``None``, the family default (:data:`~prefix_hooks.lora.targets.DEFAULT_TARGET_MODULES`).
            Lists are stored as a set, as PEFT does.
        exclude_modules: modules never targeted, with the same matching (list or regex).
        layers_to_transform: only modules of these layer indices (an int or a list of ints
            >= 0); needs a list ``target_modules``. The index is the number after
            ``layers_pattern``, or by default the first numeric name component at depth >= 2
            (``model.layers.3.…`` -> 3), as PEFT.
        layers_pattern: name (regex) of the layer container(s) holding the index, e.g.
            ``"layers"`` or ``["h", "layers"]``; needs ``layers_to_transform``.
        rank_pattern: module-name regex -> rank overriding ``r`` for the modules whose
            qualified name ends with a match (first matching key wins, in dict order).
        alpha_pattern: module-name regex -> alpha overriding ``lora_alpha``, same matching.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init_lora_weights: ``True`` (Kaiming-uniform ``A``, zero ``B``: the adapter starts as a
            no-op), ``"gaussian"`` (normal ``A`` with std ``1/r``, zero ``B``) or ``False``
            (random ``A`` and ``B``, for tests).
        fan_in_fan_out: the target stores its weight as (in, out); transformers' ``Conv1D``
            is recognised automatically whatever this says.
        bias: ``"none"``, ``"all"`` (every bias of the model trains) or ``"lora_only"`` (the
            biases of the target modules train).
        modules_to_save: modules (exact name or dotted suffix) trained as full copies,
            e.g. a freshly initialised ``"classifier"`` head.
        task_type: the model's task (:class:`~prefix_hooks.core.config.TaskType`); as in PEFT,
            ``SEQ_CLS`` / ``TOKEN_CLS`` also save ``classifier`` / ``score`` and
            ``QUESTION_ANS`` saves ``qa_outputs`` (see ``targets.modules_to_save_names``).
        inference_mode: adapters are built frozen.
        peft_type: always ``"LORA"``.
        base_model_name_or_path: informational, as in PEFT.
        revision: informational, as in PEFT.

    Raises:
        ValueError: a field has a value PEFT's LoRA would not accept (or one this package
            does not implement, such as PiSSA initialisation); the message names the value
            and what is accepted. Nothing is mutated before validation completes.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | set[str] | tuple[str, ...] | str | None = None
    exclude_modules: list[str] | set[str] | tuple[str, ...] | str | None = None
    layers_to_transform: list[int] | tuple[int, ...] | int | None = None
    layers_pattern: list[str] | tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | set[str] | tuple[str, ...] | None = None
    peft_type: PeftType | str = field(default=LORA_PEFT_TYPE, kw_only=True)

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is not accepted; expected a positive int (the LoRA rank)")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is not accepted; expected a positive number")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is not accepted; expected a float with 0 <= p < 1")
        target_modules = _module_filter("target_modules", self.target_modules, allow_empty=False)
        exclude_modules = _module_filter("exclude_modules", self.exclude_modules, allow_empty=True)
        layers_to_transform = self._checked_layers_to_transform()
        layers_pattern = self._checked_layers_pattern()
        if isinstance(target_modules, str) and layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={layers_to_transform!r} needs target_modules as a list of names, not the "
                f"string {target_modules!r}; put the layer numbers into the regex instead"
            )
        if layers_pattern is not None and layers_to_transform is None:
            raise ValueError(f"layers_pattern={layers_pattern!r} is set but layers_to_transform is None; set both")
        rank_pattern = _pattern_dict("rank_pattern", self.rank_pattern, integer=True)
        alpha_pattern = _pattern_dict("alpha_pattern", self.alpha_pattern, integer=False)
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            _check_bool(name, getattr(self, name))
        if self.init_lora_weights not in (True, False, "gaussian") or not isinstance(
            self.init_lora_weights, (bool, str)
        ):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not accepted; expected True (Kaiming-uniform A, "
                "zero B), 'gaussian' or False"
            )
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not accepted; expected one of {', '.join(BIAS_MODES)}")
        modules_to_save = None
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError(
                    f"modules_to_save={self.modules_to_save!r} is not accepted; expected a list of module names"
                )
            names = _names("modules_to_save", self.modules_to_save, allow_empty=True)
            # A list keeps the user's order (duplicates dropped); a set has none, so sort it.
            ordered = sorted(names) if isinstance(self.modules_to_save, (set, frozenset)) else self.modules_to_save
            modules_to_save = list(dict.fromkeys(ordered))
        task_type = self._checked_task_type()
        if self.peft_type != LORA_PEFT_TYPE:
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected {LORA_PEFT_TYPE.value!r}")
        self._check_common_fields()
        # Everything is valid: store the normalised values.
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.layers_to_transform = layers_to_transform
        self.layers_pattern = layers_pattern
        self.rank_pattern = rank_pattern
        self.alpha_pattern = alpha_pattern
        self.modules_to_save = modules_to_save
        self.task_type = task_type
        self.peft_type = PeftType.LORA

    def _checked_layers_to_transform(self) -> list[int] | int | None:
        value = self.layers_to_transform
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, (list, tuple)) and all(_is_int(item) and item >= 0 for item in value):
            return list(value)
        raise ValueError(
            f"layers_to_transform={value!r} is not accepted; expected a layer index >= 0, a list of them, or None"
        )

    def _checked_layers_pattern(self) -> list[str] | str | None:
        value = self.layers_pattern
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) and item for item in items):
            raise ValueError(
                f"layers_pattern={value!r} is not accepted; expected the name (regex) of the layer container, "
                "e.g. 'layers', or a list of them"
            )
        for item in items:
            _check_regex("layers_pattern", item)
        return value if isinstance(value, str) else list(value)

    def _checked_task_type(self) -> TaskType | None:
        if self.task_type is None:
            return None
        try:
            return TaskType(self.task_type)
        except ValueError:
            accepted = ", ".join(t.value for t in TaskType)
            raise ValueError(f"task_type={self.task_type!r} is not accepted; expected one of {accepted} or None") from None

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Rank and alpha of the adapter on ``module_name`` (a qualified name from ``named_modules()``).

        A ``rank_pattern`` / ``alpha_pattern`` key applies when it matches the end of the name at a
        component boundary (``re.match(rf"(.*\\.)?({key})$", module_name)``); the first matching key
        in dict order wins; otherwise ``r`` / ``lora_alpha``. This is PEFT's rule.
        """
        rank_key = _pattern_key(list(self.rank_pattern), module_name)
        alpha_key = _pattern_key(list(self.alpha_pattern), module_name)
        rank = self.r if rank_key is None else self.rank_pattern[rank_key]
        alpha = self.lora_alpha if alpha_key is None else self.alpha_pattern[alpha_key]
        return rank, alpha

    def scaling(self, module_name: str) -> float:
        """``alpha / r`` for ``module_name`` (``alpha / sqrt(r)`` with ``use_rslora``)."""
        rank, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with PEFT's key names (sets as sorted lists, enums as strings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (dict, list)):
                value = type(value)(value)
            out[f.name] = value
        return out
