"""Prompt tuning and P-tuning attached through hooks.

>>> from prefix_hooks.prompt import attach_prompt, PromptTuningConfig
>>> with attach_prompt(model, PromptTuningConfig(num_virtual_tokens=20)) as handle:
...     trainer.train()
"""

from prefix_hooks.core.compose import register_method
from prefix_hooks.prompt.attachment import PromptAttachment, attach_prompt
from prefix_hooks.prompt.config import (
    PromptConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from prefix_hooks.prompt.modules import PromptEmbedding, PromptEncoder

__all__ = [
    "PromptAttachment",
    "PromptConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "attach_prompt",
]

register_method(PromptTuningConfig, attach_prompt)
register_method(PromptEncoderConfig, attach_prompt)
