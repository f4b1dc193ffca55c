"""Which modules AdaLoRA adapts by default: PEFT 0.21's AdaLoRA table, LoRA's for the other families.

PEFT's AdaLoRA defaults differ from its LoRA defaults for six families (every attention and
feed-forward projection of T5, mT5, BART, OPT, RoBERTa and DeBERTa-v2) and are missing for some
families LoRA knows (PEFT then asks for ``target_modules``); here those take LoRA's default.
Selection itself is LoRA's (:func:`prefix_hooks.lora.targets.select_targets`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from prefix_hooks.core.targets import family_default
from prefix_hooks.lora.adalora.config import AdaLoraConfig
from prefix_hooks.lora.targets import DEFAULT_TARGET_MODULES

__all__ = ["ADALORA_TARGET_MODULES", "with_default_targets"]

ADALORA_TARGET_MODULES: dict[str, list[str] | str] = {
    **DEFAULT_TARGET_MODULES,
    # PEFT 0.21's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING where it differs from LoRA's
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
"""``config.model_type`` -> default ``target_modules`` of AdaLoRA (a list of names, or a full-match regex)."""


def with_default_targets(model: nn.Module, config: AdaLoraConfig) -> AdaLoraConfig:
    """``config``, or with ``target_modules=None`` a copy naming the family's AdaLoRA default.

    The copy states the targets explicitly, so a saved adapter selects the same modules in PEFT
    (which has no AdaLoRA default for some families).

    Raises:
        ValueError: ``target_modules=None`` and the family has no default.
    """
    if config.target_modules is not None:
        return config
    targets = family_default(model, ADALORA_TARGET_MODULES, "target_modules")
    return dataclasses.replace(config, target_modules=targets if isinstance(targets, str) else list(targets))
