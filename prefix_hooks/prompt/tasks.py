"""What the model's task means for a prompt: whether ``labels`` are per token (and shifted), whether a
classifier pools the last position, and how Trainer must average the loss.

The config's ``task_type`` decides; without one, the model's class name does (transformers' naming:
``...ForCausalLM``, ``...ForTokenClassification``, ...).
"""

from __future__ import annotations

from torch import nn

from prefix_hooks.core.config import TaskType
from prefix_hooks.core.shadows import shadow_attribute
from prefix_hooks.core.undo import UndoStack
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig

_PER_TOKEN_TASKS = frozenset({TaskType.CAUSAL_LM, TaskType.TOKEN_CLS})
_PER_TOKEN_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForTokenClassification", "ForMaskedLM")


def labels_per_token(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> bool:
    """Whether ``labels`` has one entry per input token (causal LM, token classification, masked LM)."""
    if config.task_type is not None:
        return config.task_type in _PER_TOKEN_TASKS
    return type(model).__name__.endswith(_PER_TOKEN_CLASS_SUFFIXES)


def predicts_next_token(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> bool:
    """Whether ``model``'s loss shifts the labels (a causal LM)."""
    if config.task_type is not None:
        return config.task_type == TaskType.CAUSAL_LM
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def pools_last_position(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder classifier (transformers' generic ``...ForSequenceClassification``
    with a ``score`` head), which pools the last non-pad token found from ``input_ids``."""
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(model, "score", None), nn.Module
    )


def report_mean_loss_to_trainer(model: nn.Module, undo: UndoStack) -> None:
    """Make a ``Trainer`` built while attached use the model's mean loss (``accepts_loss_kwargs =
    False`` on the instance, removed again by ``undo``).

    Trainer otherwise passes ``num_items_in_batch``, counted as the labels a causal LM predicts
    without a prompt (``labels[..., 1:]``); with a prompt the model also predicts the first real
    token from the last virtual one, so the summed loss divided by that count is ``L / (L - 1)``
    too large (PEFT's Trainer losses are). Trainer then averages micro-batch losses itself.
    """
    shadow_attribute(model, "accepts_loss_kwargs", False, undo)
