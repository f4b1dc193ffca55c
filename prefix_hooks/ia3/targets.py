"""Which modules of a model get an (IA)^3 vector, and which of them scale their input.

The rules are PEFT 0.21's, so a config selects the same modules here as in
``peft.get_peft_model`` (checked against PEFT in ``tests/ia3/test_ia3_config.py``):

* targets: the rules every weight-adapting method shares (:mod:`prefix_hooks.core.targets`):
  a list entry matches a qualified name equal to it or ending with ``"." + entry``; a string
  is a full-match regex; ``"all-linear"`` is every Linear / Conv1D but the output head;
  ``None`` is the family default (:data:`DEFAULT_TARGET_MODULES`). ``exclude_modules`` and
  modules inside a module to save are never targets.
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

from prefix_hooks.core.targets import AdaptableModules, family_default, select_modules, task_heads
from prefix_hooks.ia3.config import IA3Config

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

_ADAPTABLE = AdaptableModules("(IA)^3", "scale", SUPPORTED_MODULE_TYPES, "torch.nn.Linear, transformers Conv1D")

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
    return task_heads(config.task_type)


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
    targets = requested if requested is not None else family_default(model, DEFAULT_TARGET_MODULES, "target_modules")
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = family_default(model, DEFAULT_FEEDFORWARD_MODULES, "feedforward_modules")
    assert not isinstance(feedforward, tuple)  # normalised by IA3Config
    described = f"target_modules={targets!r}" + (" (the family default)" if requested is None else "")
    selected = select_modules(model, targets, config, _ADAPTABLE, described=described, legacy_names=legacy_names)
    return [
        Target(target.name, target.module, any(_is_feedforward(n, feedforward) for n in target.spellings))
        for target in selected
    ]
