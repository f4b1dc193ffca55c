"""Configuration of (IA)^3, with the field names, meanings and defaults of PEFT 0.21's ``IA3Config``.

(IA)^3 (Liu et al., 2022) learns one vector per target module: a regular target's output is
multiplied by it (``y = base(x) * l``, ``l`` of shape ``(out_features, 1)``), a feed-forward
target's input is (``y = base(x * l)``, ``l`` of shape ``(1, in_features)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefix_hooks.core.config import AdapterConfig, PeftType
from prefix_hooks.core.config_fields import checked_module_fields, module_filter

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
        checked = checked_module_fields(self, IA3_PEFT_TYPE, ("fan_in_fan_out", "init_ia3_weights", "inference_mode"))
        # an empty list is accepted: "no feed-forward module" (PEFT's mt5 default is [])
        feedforward_modules = module_filter("feedforward_modules", self.feedforward_modules, allow_empty=True)
        checked["feedforward_modules"] = feedforward_modules
        target_modules = checked["target_modules"]
        if isinstance(feedforward_modules, set) and isinstance(target_modules, set):
            extra = sorted(feedforward_modules - target_modules)
            if extra:
                raise ValueError(
                    f"feedforward_modules={sorted(feedforward_modules)!r} is not a subset of "
                    f"target_modules={sorted(target_modules)!r} ({extra!r} not targeted); every feed-forward "
                    "module must also be a target"
                )
        self._check_common_fields()
        for name, value in checked.items():  # everything is valid: store the normalised values
            setattr(self, name, value)
