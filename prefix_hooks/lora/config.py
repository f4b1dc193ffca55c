"""Configuration of LoRA, with the field names, meanings and defaults of PEFT's ``LoraConfig``.

A LoRA adapter replaces a frozen weight ``W`` (out, in) by ``W + scaling * B @ A`` with
``A`` (r, in), ``B`` (out, r) and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``), Hu et al. (2021); with ``use_dora`` by ``m / ||W + scaling * B @ A||_c *
(W + scaling * B @ A)`` (DoRA). The config says which modules get an adapter
(see :mod:`prefix_hooks.lora.targets`) and with which rank and alpha.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefix_hooks.core.config import AdapterConfig, PeftType
from prefix_hooks.core.config_fields import (
    check_regex,
    checked_module_fields,
    is_int,
    is_number,
)
from prefix_hooks.core.targets import ALL_LINEAR

__all__ = [
    "ALL_LINEAR",
    "BIAS_MODES",
    "LORA_PEFT_TYPE",
    "LoraConfig",
    "check_init_lora_weights",
    "check_lora_numbers",
    "lora_scaling",
]

BIAS_MODES = ("none", "all", "lora_only")
LORA_PEFT_TYPE = PeftType.LORA
INIT_LORA_WEIGHTS = (True, False, "gaussian")


def check_lora_numbers(r: object, alpha: object, dropout: object, where: str = "") -> None:
    """Raise ``ValueError`` naming the first of rank ``r``, ``alpha`` and ``dropout`` LoRA does not accept.

    Args:
        where: appended to the value in the message (e.g. ``" for adapter 'sql'"``).
    """
    if not is_int(r) or r <= 0:
        raise ValueError(f"r={r!r} is not accepted{where}; expected a positive int (the LoRA rank)")
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora_alpha={alpha!r} is not accepted{where}; expected a positive number")
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout={dropout!r} is not accepted{where}; expected a float with 0 <= p < 1")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_init_lora_weights(value: object, where: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an ``init_lora_weights`` this package implements.

    Args:
        where: appended to the value in the message (e.g. ``" for adapter 'sql'"``).
    """
    if value not in INIT_LORA_WEIGHTS or not isinstance(value, (bool, str)):
        raise ValueError(
            f"init_lora_weights={value!r} is not accepted{where}; expected True (Kaiming-uniform A, zero B), "
            "'gaussian' or False"
        )


def _pattern_dict(name: str, value: object, *, integer: bool) -> dict[str, Any]:
    accepted = "positive ints" if integer else "positive numbers"
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={value!r} is not accepted; expected a dict of module-name regex -> {accepted}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} key {key!r} is not accepted; expected a non-empty module-name regex")
        check_regex(f"{name} key", key)
        valid = is_int(item) if integer else is_number(item)
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
        use_dora: DoRA (Liu et al., 2024), weight-decomposed LoRA: each target also trains a
            magnitude ``m`` per output feature and computes with
            ``m / ||W + scaling * B @ A||_c * (W + scaling * B @ A)`` (see
            :mod:`prefix_hooks.lora.dora`). Every supported layer type takes it but a Conv2d
            with ``groups > 1``, which is refused when the adapter is built.
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
    use_dora: bool = False
    peft_type: PeftType | str = field(default=LORA_PEFT_TYPE, kw_only=True)

    def __post_init__(self) -> None:
        check_lora_numbers(self.r, self.lora_alpha, self.lora_dropout)
        checked = checked_module_fields(
            self, LORA_PEFT_TYPE, ("use_rslora", "fan_in_fan_out", "inference_mode", "use_dora")
        )
        checked["layers_to_transform"] = layers_to_transform = self._checked_layers_to_transform()
        checked["layers_pattern"] = layers_pattern = self._checked_layers_pattern()
        if isinstance(checked["target_modules"], str) and layers_to_transform is not None:
            raise ValueError(
                f"layers_to_transform={layers_to_transform!r} needs target_modules as a list of names, not the "
                f"string {checked['target_modules']!r}; put the layer numbers into the regex instead"
            )
        if layers_pattern is not None and layers_to_transform is None:
            raise ValueError(f"layers_pattern={layers_pattern!r} is set but layers_to_transform is None; set both")
        checked["rank_pattern"] = _pattern_dict("rank_pattern", self.rank_pattern, integer=True)
        checked["alpha_pattern"] = _pattern_dict("alpha_pattern", self.alpha_pattern, integer=False)
        check_init_lora_weights(self.init_lora_weights)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not accepted; expected one of {', '.join(BIAS_MODES)}")
        self._check_common_fields()
        for name, value in checked.items():  # everything is valid: store the normalised values
            setattr(self, name, value)

    def _checked_layers_to_transform(self) -> list[int] | int | None:
        value = self.layers_to_transform
        if value is None:
            return None
        if is_int(value) and value >= 0:
            return value
        if isinstance(value, (list, tuple)) and all(is_int(item) and item >= 0 for item in value):
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
            check_regex("layers_pattern", item)
        return value if isinstance(value, str) else list(value)

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
        return lora_scaling(rank, alpha, self.use_rslora)
