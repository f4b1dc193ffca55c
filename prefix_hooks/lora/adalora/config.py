"""Configuration of AdaLoRA (Zhang et al., 2023), with the fields, meanings and defaults of PEFT 0.21's
``AdaLoraConfig``.

AdaLoRA parametrises each target's update in SVD form, ``W + B diag(E) A * lora_alpha / ranknum``,
starts every target at rank ``init_r`` and prunes singular triplets ``(A_i, E_i, B_i)`` during
training until the whole model keeps ``target_r`` per target on average. The schedule has three
phases over ``total_step`` optimizer steps::

    steps 0 .. tinit                      warm-up: every triplet kept
    steps tinit .. total_step - tfinal    the budget falls cubically from init_r * n to target_r * n
                                          (n targets); every deltaT steps the least important
                                          triplets are masked (E_i = 0)
    steps total_step - tfinal ..          the final mask (rank_pattern) is fixed and re-applied

See :mod:`prefix_hooks.lora.adalora.allocator` for the importance scores.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from prefix_hooks.core.config import PeftType
from prefix_hooks.core.config_fields import is_int, is_number
from prefix_hooks.lora.config import LoraConfig

__all__ = ["ADALORA_PEFT_TYPE", "AdaLoraConfig", "RankPattern"]

ADALORA_PEFT_TYPE = PeftType.ADALORA

RankPattern = dict[str, list[bool]]
"""Module key -> which of the ``init_r`` singular triplets are kept (PEFT's ``rank_pattern``)."""

PEFT_DEFAULT_R = 8
"""PEFT's ``LoraConfig.r``; AdaLoRA ignores ``r`` and warns when it differs (as PEFT)."""

_LORA_ONLY = ("use_rslora", "alpha_pattern")
"""LoRA fields PEFT's AdaLoRA accepts but ignores; here they must keep their defaults."""


def _positive_int(name: str, value: object) -> int:
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not accepted; expected a positive int")
    return value


def _non_negative_int(name: str, value: object) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 0")
    return value


def _checked_rank_pattern(value: object, init_r: int) -> RankPattern | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"rank_pattern={value!r} is not accepted; expected None or a dict of '<module>.lora_E' -> a list of "
            "init_r booleans (what AdaLoRA's allocation writes)"
        )
    out: RankPattern = {}
    for key, kept in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"rank_pattern key {key!r} is not accepted; expected '<module>.lora_E'")
        if not isinstance(kept, (list, tuple)) or not all(isinstance(item, bool) for item in kept):
            raise ValueError(f"rank_pattern[{key!r}]={kept!r} is not accepted; expected a list of booleans")
        if len(kept) != init_r:
            raise ValueError(
                f"rank_pattern[{key!r}] has {len(kept)} entries but init_r={init_r}; it must say for each of the "
                "init_r singular triplets whether it is kept"
            )
        out[key] = list(kept)
    return out


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: LoRA in SVD form whose ranks are allocated during training (see the module docstring).

    The LoRA fields keep their meaning (``target_modules``, ``lora_alpha``, ``lora_dropout``, ``bias``,
    ``modules_to_save``, ``layers_to_transform``, ...); ``r`` is ignored (PEFT warns, so do we).
    Defaults and names are PEFT 0.21's, so a config converts to and from PEFT's ``adapter_config.json``.

    Args:
        target_r: the average rank per target the allocation ends with; a positive int.
        init_r: every target's rank before pruning; ``init_r >= target_r``.
        tinit: warm-up steps before the budget starts falling (an int >= 0).
        tfinal: steps at the end with the final rank pattern fixed (an int >= 0).
        deltaT: mask every ``deltaT`` steps while the budget falls; a positive int.
        beta1: EMA factor of the sensitivity ``|p * grad|`` (``0 < beta1 < 1``).
        beta2: EMA factor of its uncertainty (``0 < beta2 < 1``).
        orth_reg_weight: weight of the orthogonal regulariser added to the model's loss (>= 0);
            see :mod:`prefix_hooks.lora.adalora.orthogonal` for what exactly is added and when.
        total_step: the number of optimizer steps of the training; required, and
            ``total_step > tinit + tfinal`` so that the budget has steps to fall.
        rank_pattern: the allocation's result, ``"<module>.lora_E" -> [kept, ...]`` with ``init_r``
            booleans per target (PEFT's); ``None`` before any allocation. Written by saving an
            allocated adapter; loading one keeps only the kept triplets, as PEFT does.
        init_lora_weights: truthy (``True`` or ``"gaussian"``, as in PEFT): ``E = 0`` and ``A``, ``B``
            normal with std 0.02, so the adapter starts as a no-op; ``False``: all three standard normal.
        peft_type: always ``"ADALORA"``.

    Raises:
        ValueError: a field PEFT's AdaLoRA would not accept, or a LoRA-only option it would silently
            ignore (``use_rslora=True``, a non-empty ``alpha_pattern``, DoRA); the message names the
            value and what is accepted. Nothing is mutated before validation completes.

    Example:
        >>> config = AdaLoraConfig(init_r=12, target_r=4, tinit=20, tfinal=20, total_step=200)
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: RankPattern | None = None  # type: ignore[assignment]  # AdaLoRA's meaning, PEFT's name
    peft_type: PeftType | str = field(default=ADALORA_PEFT_TYPE, kw_only=True)

    def __post_init__(self) -> None:
        lora = self._checked_lora_fields()
        checked = self._checked_schedule()
        rank_pattern = _checked_rank_pattern(self.rank_pattern, checked["init_r"])
        for name in _lora_field_names():  # everything is valid: store the normalised values
            setattr(self, name, getattr(lora, name))
        for name, value in checked.items():
            setattr(self, name, value)
        self.rank_pattern = rank_pattern
        self.peft_type = ADALORA_PEFT_TYPE
        if self.r != PEFT_DEFAULT_R:
            warnings.warn(
                f"r={self.r} is not used by AdaLoRA and is ignored; the initial rank is init_r={self.init_r}",
                UserWarning,
                stacklevel=3,
            )

    def _checked_lora_fields(self) -> LoraConfig:
        """The fields LoRA shares, validated and normalised by ``LoraConfig`` itself."""
        if self.peft_type not in (ADALORA_PEFT_TYPE, ADALORA_PEFT_TYPE.value):
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected {ADALORA_PEFT_TYPE.value!r}")
        if getattr(self, "use_dora", False):
            raise ValueError("ADALORA does not support DoRA (use_dora=True); use LoraConfig for DoRA")
        defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
        defaults["alpha_pattern"] = {}
        for name in _LORA_ONLY:
            if getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not accepted: AdaLoRA scales every update by "
                    f"lora_alpha / ranknum (PEFT's AdaLoRA ignores {name}); leave it at {defaults[name]!r}"
                )
        return LoraConfig(**{name: getattr(self, name) for name in _lora_field_names()})

    def _checked_schedule(self) -> dict[str, int]:
        target_r = _positive_int("target_r", self.target_r)
        init_r = _positive_int("init_r", self.init_r)
        if init_r < target_r:
            raise ValueError(
                f"init_r={init_r} is smaller than target_r={target_r}; AdaLoRA prunes each target from init_r "
                "triplets down to target_r on average, so init_r >= target_r"
            )
        tinit = _non_negative_int("tinit", self.tinit)
        tfinal = _non_negative_int("tfinal", self.tfinal)
        delta_t = _positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < 1:
                raise ValueError(f"{name}={value!r} is not accepted; expected a number with 0 < {name} < 1")
        weight = self.orth_reg_weight
        if not is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"orth_reg_weight={weight!r} is not accepted; expected a number >= 0")
        total_step = self.total_step
        if not is_int(total_step) or total_step <= 0:
            raise ValueError(
                f"total_step={total_step!r} is not accepted; AdaLoRA needs the number of training steps (a positive "
                "int) to schedule the rank budget"
            )
        if tinit >= total_step - tfinal:
            raise ValueError(
                f"tinit={tinit} and tfinal={tfinal} leave no budgeting phase within total_step={total_step}; "
                "AdaLoRA needs total_step > tinit + tfinal (decrease tinit / tfinal or increase total_step)"
            )
        return {"target_r": target_r, "init_r": init_r, "tinit": tinit, "tfinal": tfinal, "deltaT": delta_t}

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Not LoRA's question: an AdaLoRA target's rank is allocated during training.

        Raises:
            TypeError: always; an ``AdaLoraConfig`` builds an AdaLoRA adapter (``attach_adalora``,
                ``attach``), never a LoRA one, which is what asks this.
        """
        raise TypeError(
            "an AdaLoraConfig builds an AdaLoRA adapter: use attach_adalora(model, config) or attach(model, config), "
            "not attach_lora / LoraAttachment"
        )


def _lora_field_names() -> list[str]:
    """The init fields AdaLoRA shares with LoRA, checked by ``LoraConfig`` (but peft_type and rank_pattern)."""
    return [f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name not in ("peft_type", "rank_pattern")]
