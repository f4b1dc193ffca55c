"""Configuration of (IA)^3, with the field names, meanings and defaults of PEFT 0.21's ``IA3Config``.

(IA)^3 (Liu et al., 2022) learns one vector per target module: a regular target's output is
multiplied by it (``y = base(x) * l``, ``l`` of shape ``(out_features, 1)``), a feed-forward
target's input is (``y = base(x * l)``, ``l`` of shape ``(1, in_features)``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType
from prefix_hooks.lora.config import _check_bool, _module_filter, _names

IA3_PEFT_TYPE = PeftType.IA3

ModuleNames = list[str] | set[str] | tuple[str, ...] | str | None


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3: learned vectors rescaling the outputs (or, for feed-forward modules, the inputs) of targets.

    Field names, meanings and defaults are PEFT 0.21's, so a config converts to and from a PEFT
    ``adapter_config.json`` (:meth:`to_dict`).

    Args:
        target_modules: which modules get a vector. A list (or set/tuple) of names, each matching
            a module whose qualified name equals it or ends with ``"." + name``; a string, a
            regular expression that must match the whole qualified name; ``"all-linear"``, every
            ``nn.Linear`` / transformers ``Conv1D`` except the output head; ``None``, the family
            default (:data:`~prefix_hooks.ia3.targets.DEFAULT_TARGET_MODULES`). Lists are stored
            as sets, as PEFT does.
        exclude_modules: modules never targeted, with the same matching (list or regex).
        feedforward_modules: the targets whose *input* is scaled. A list: a target is
            feed-forward when its qualified name ends with an entry (PEFT's plain suffix test,
            kept so that PEFT configs select the same modules); a string: a regex that must
            match the whole name; ``None``: the family default
            (:data:`~prefix_hooks.ia3.targets.DEFAULT_FEEDFORWARD_MODULES`). When both are
            lists, ``feedforward_modules`` must be a subset of ``target_modules``.
        fan_in_fan_out: the target stores its weight as (in, out). transformers' ``Conv1D`` is
            recognised by its type whatever this says (PEFT overrides the flag the same way).
        modules_to_save: modules (exact name or dotted suffix) trained as full copies, e.g. a
            freshly initialised ``"classifier"`` head.
        init_ia3_weights: ``True``: vectors start at ones (the adapter is a no-op);
            ``False``: standard normal (for tests).
        task_type: the model's task; as in PEFT, ``SEQ_CLS`` / ``TOKEN_CLS`` also save
            ``classifier`` / ``score`` and ``QUESTION_ANS`` saves ``qa_outputs`` as full copies.
        inference_mode: vectors (and copies) are built frozen.
        peft_type: always ``"IA3"``.
        base_model_name_or_path, revision: informational, as in PEFT.

    Raises:
        ValueError: a field has a value PEFT's IA3 would not accept; the message names the
            value and what is accepted.
    """

    target_modules: ModuleNames = None
    exclude_modules: ModuleNames = None
    feedforward_modules: ModuleNames = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | set[str] | tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    peft_type: PeftType | str = field(default=IA3_PEFT_TYPE, kw_only=True)

    def __post_init__(self) -> None:
        target_modules = _module_filter("target_modules", self.target_modules, allow_empty=False)
        exclude_modules = _module_filter("exclude_modules", self.exclude_modules, allow_empty=True)
        feedforward_modules = self._checked_feedforward()
        if isinstance(feedforward_modules, set) and isinstance(target_modules, set):
            extra = sorted(feedforward_modules - target_modules)
            if extra:
                raise ValueError(
                    f"feedforward_modules={sorted(feedforward_modules)!r} is not a subset of "
                    f"target_modules={sorted(target_modules)!r} ({extra!r} not targeted); every feed-forward "
                    "module must also be a target"
                )
        for name in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            _check_bool(name, getattr(self, name))
        modules_to_save = self._checked_modules_to_save()
        task_type = self._checked_task_type()
        if self.peft_type != IA3_PEFT_TYPE:
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected {IA3_PEFT_TYPE.value!r}")
        self._check_common_fields()
        # Everything is valid: store the normalised values.
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.feedforward_modules = feedforward_modules
        self.modules_to_save = modules_to_save
        self.task_type = task_type
        self.peft_type = IA3_PEFT_TYPE

    def _checked_feedforward(self) -> set[str] | str | None:
        value = self.feedforward_modules
        if isinstance(value, str) and value.lower() == "all-linear":
            raise ValueError(
                f"feedforward_modules={value!r} is not accepted; 'all-linear' is a target_modules shorthand. "
                "Give a list of module names or a regex"
            )
        if isinstance(value, (list, set, tuple, frozenset)) and not value:
            return set()  # PEFT accepts "no feed-forward module" (its mt5 default is [])
        return _module_filter("feedforward_modules", value, allow_empty=True)

    def _checked_modules_to_save(self) -> list[str] | None:
        if self.modules_to_save is None:
            return None
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"modules_to_save={self.modules_to_save!r} is not accepted; expected a list of module names")
        names = _names("modules_to_save", self.modules_to_save, allow_empty=True)
        ordered = sorted(names) if isinstance(self.modules_to_save, (set, frozenset)) else self.modules_to_save
        return list(dict.fromkeys(ordered))

    def _checked_task_type(self) -> TaskType | None:
        if self.task_type is None:
            return None
        try:
            return TaskType(self.task_type)
        except ValueError:
            accepted = ", ".join(t.value for t in TaskType)
            raise ValueError(f"task_type={self.task_type!r} is not accepted; expected one of {accepted} or None") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with PEFT's key names (sets as sorted lists, enums as strings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out
