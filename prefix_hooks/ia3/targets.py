"""Which modules of a model get an (IA)^3 vector, and which of them scale their input.

The rules are PEFT 0.21's, so a config selects the same modules here as in
``peft.get_peft_model`` (checked against PEFT in ``tests/test_ia3_targets.py``):

* targets: as LoRA's (:mod:`prefix_hooks.lora.targets`): a list entry matches a qualified
  name equal to it or ending with ``"." + entry``; a string is a full-match regex;
  ``"all-linear"`` is every Linear / Conv1D but the output head; ``None`` is the family
  default (:data:`DEFAULT_TARGET_MODULES`). ``exclude_modules`` and modules inside a module
  to save are never targets.
* feed-forward: a list entry matches a name that *ends with* it (PEFT's plain suffix test);
  a string is a full-match regex; ``None`` is the family default
  (:data:`DEFAULT_FEEDFORWARD_MODULES`).

A target already wrapped by an attached LoRA adapter resolves to the original module inside
the LoRA layer (its ``base_layer``): (IA)^3 scales the original module's output (or input),
whichever method attached first. Selection only reads the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.config import TaskType
from prefix_hooks.core.legacy_names import legacy_module_names, spellings
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.lora.config import ALL_LINEAR
from prefix_hooks.lora.targets import (
    TASK_MODULES_TO_SAVE,
    _all_linear_names,
    _candidates,
    _inside,
    _matches_names,
    _wrapped_base,
)

__all__ = [
    "DEFAULT_FEEDFORWARD_MODULES",
    "DEFAULT_TARGET_MODULES",
    "SUPPORTED_MODULE_TYPES",
    "Target",
    "select_targets",
    "task_modules_to_save",
]

SUPPORTED_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Module types an (IA)^3 vector can scale (subclasses included)."""

_LLAMA_LIKE = ["k_proj", "v_proj", "down_proj"]
_BERT_LIKE = ["key", "value", "output.dense"]
_LLAVA = r".*language_model\..*\.(k_proj|v_proj|down_proj)"  # the text tower only

DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    # PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (same values) ...
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": _BERT_LIKE,
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": _LLAMA_LIKE,
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": _LLAMA_LIKE,
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": _BERT_LIKE,
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    # ... and the families PEFT has no default for: keys, values and the feed-forward down projection.
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "mbart": ["k_proj", "v_proj", "fc2"],
    "whisper": ["k_proj", "v_proj", "fc2"],
    "codegen": ["qkv_proj", "fc_out"],  # fused query/key/value projection
    "mpt": ["Wqkv", "down_proj"],
    "phi3": ["qkv_proj", "down_proj"],
    "distilbert": ["k_lin", "v_lin", "lin2"],
    "modernbert": ["Wqkv", "mlp.Wo"],
    "vit": ["k_proj", "v_proj", "fc2"],  # transformers 5 names
    "deit": ["k_proj", "v_proj", "fc2"],
    "dinov2": ["k_proj", "v_proj", "fc2"],
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "starcoder2": ["k_proj", "v_proj", "c_proj"],
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "llava": _LLAVA,
}
"""``config.model_type`` -> default ``target_modules`` (a list of names, or a full-match regex)."""

DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str] | str] = {
    # PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING ...
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    # ... and ours.
    "xlm-roberta": ["output.dense"],
    "electra": ["output.dense"],
    "mbart": ["fc2"],
    "whisper": ["fc2"],
    "codegen": ["fc_out"],
    "mpt": ["down_proj"],
    "phi3": ["down_proj"],
    "distilbert": ["lin2"],
    "modernbert": ["mlp.Wo"],
    "vit": ["fc2"],
    "deit": ["fc2"],
    "dinov2": ["fc2"],
    "qwen2_moe": ["down_proj"],
    "qwen3_moe": ["down_proj"],
    "starcoder2": ["c_proj"],
    "olmo": ["down_proj"],
    "olmo2": ["down_proj"],
    "llava": r".*language_model\..*\.down_proj",
}
"""``config.model_type`` -> default ``feedforward_modules``."""

_EXAMPLES_IN_ERRORS = 6


@dataclass(frozen=True)
class Target:
    """One selected module: its qualified name, the module object scaled, and where the vector goes.

    ``module`` is the original module (inside a LoRA layer when LoRA wraps that name).
    """

    name: str
    module: nn.Module
    feedforward: bool


def task_modules_to_save(config: IA3Config) -> tuple[str, ...]:
    """The heads ``config.task_type`` saves implicitly, as PEFT's task models do; may match nothing."""
    if config.task_type is None:
        return ()
    return TASK_MODULES_TO_SAVE.get(TaskType(config.task_type), ())


def _family_default(model: nn.Module, table: dict[str, list[str] | str], field: str) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = table.get(model_type) if isinstance(model_type, str) else None
    if default is None:
        raise ValueError(
            f"{field}=None but model_type={model_type!r} ({type(model).__name__}) has no default {field}; "
            f"pass {field}: a list of module names or a regex"
        )
    return default


def _is_feedforward(name: str, feedforward: list[str] | set[str] | str) -> bool:
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)  # PEFT's plain suffix test


def select_targets(model: nn.Module, config: IA3Config, *, legacy_names: bool = True) -> list[Target]:
    """The modules of ``model`` that get a vector, in ``named_modules()`` order.

    With ``legacy_names`` a module renamed by transformers 5 also matches (and is a
    feed-forward target) by its old name (:mod:`prefix_hooks.core.legacy_names`).

    Raises:
        ValueError: no module matches; a matched module is not an ``nn.Linear`` / ``Conv1D``;
            a default is needed and the family has none. Messages name the offending value.
    """
    requested = config.target_modules
    targets = requested if requested is not None else _family_default(model, DEFAULT_TARGET_MODULES, "target_modules")
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = _family_default(model, DEFAULT_FEEDFORWARD_MODULES, "feedforward_modules")
    assert not isinstance(feedforward, tuple) and not isinstance(targets, tuple)  # normalised by IA3Config
    described = f"target_modules={targets!r}" + (" (the family default)" if requested is None else "")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = _all_linear_names(model)
    saved = [*(config.modules_to_save or []), *task_modules_to_save(config)]
    exclude = config.exclude_modules

    def is_excluded(name: str) -> bool:
        if isinstance(exclude, str):
            return re.fullmatch(exclude, name) is not None
        return bool(exclude) and _matches_names(name, exclude or ())

    def is_target(name: str) -> bool:
        return re.fullmatch(targets, name) is not None if isinstance(targets, str) else _matches_names(name, targets)

    legacy = legacy_module_names(model) if legacy_names else {}
    selected: list[Target] = []
    for name, module in _candidates(model):
        names = spellings(name, legacy)  # the module's name, and its name before transformers 5 if renamed
        if any(is_excluded(n) or any(_inside(n, key) for key in saved) for n in names):
            continue
        if any(is_target(n) for n in names):
            original = _wrapped_base(module) or module
            selected.append(Target(name, original, any(_is_feedforward(n, feedforward) for n in names)))

    for target in selected:
        if not isinstance(target.module, SUPPORTED_MODULE_TYPES):
            raise ValueError(
                f"{described} matches {target.name!r} ({type(target.module).__name__}), which (IA)^3 cannot scale; "
                "supported module types: torch.nn.Linear, transformers Conv1D. Narrow target_modules to those"
            )
    if not selected:
        examples = [name for name, module in _candidates(model) if isinstance(module, SUPPORTED_MODULE_TYPES)]
        raise ValueError(
            f"{described} (exclude_modules={exclude!r}, modules_to_save={saved!r}) matches no module of "
            f"{type(model).__name__}; modules (IA)^3 can scale include "
            f"{', '.join(examples[:_EXAMPLES_IN_ERRORS]) or 'none'}" + (", ..." if len(examples) > _EXAMPLES_IN_ERRORS else "")
        )
    return selected
