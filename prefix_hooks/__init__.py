"""prefix_hooks: parameter-efficient fine-tuning attached to a transformers model in place.

>>> from prefix_hooks import attach_prefix, PrefixTuningConfig
>>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=20)) as handle:
...     ...  # unchanged pipeline code

Methods: prefix tuning (:func:`attach_prefix`), LoRA (:func:`attach_lora`), AdaLoRA
(:func:`attach_adalora`), prompt tuning and
P-tuning (:func:`attach_prompt`), IA3 (:func:`attach_ia3`); several at once with :func:`attach`.

Layout (dependencies point down; ``tests/core/test_layering.py`` keeps them so): this module on top;
:mod:`.checkpoint` (PEFT's folders); :mod:`.families` (one module per architecture); the methods
:mod:`.prefix`, :mod:`.prompt`, :mod:`.lora`, :mod:`.ia3`; :mod:`.core` (lifecycle, shared config,
compatibility with transformers). See ``docs/architecture.md``.
"""

import logging

from prefix_hooks.checkpoint import CheckpointError, SaveAdapterCallback, load_adapter, save_adapter
from prefix_hooks.core import moved as _moved
from prefix_hooks.core import transformers_compat as _transformers_compat
from prefix_hooks.core.attachment import Attachment, attachments_of
from prefix_hooks.core.compose import MultiAttachment, attach, register_method
from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType
from prefix_hooks.families import ArchitectureAdapter, UnsupportedModelError, register_family, supported
from prefix_hooks.ia3 import IA3Attachment, IA3Config, attach_ia3
from prefix_hooks.lora import (
    AdaLoraAttachment,
    AdaLoraCallback,
    AdaLoraConfig,
    LoraAttachment,
    LoraConfig,
    active_adapters,
    adapter_rows,
    attach_adalora,
    attach_lora,
    set_active_adapters,
)
from prefix_hooks.prefix import PrefixAttachment, PrefixEncoder, PrefixTuningConfig, attach_prefix
from prefix_hooks.prompt import (
    PromptAttachment,
    PromptEmbedding,
    PromptEncoder,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    attach_prompt,
)

__all__ = [
    "AdaLoraAttachment",
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdapterConfig",
    "ArchitectureAdapter",
    "Attachment",
    "CheckpointError",
    "IA3Attachment",
    "IA3Config",
    "LoraAttachment",
    "LoraConfig",
    "MultiAttachment",
    "PeftType",
    "PrefixAttachment",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptAttachment",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SaveAdapterCallback",
    "TaskType",
    "UnsupportedModelError",
    "active_adapters",
    "adapter_rows",
    "attach",
    "attach_adalora",
    "attach_ia3",
    "attach_lora",
    "attach_prefix",
    "attach_prompt",
    "attachments_of",
    "load_adapter",
    "register_family",
    "register_method",
    "save_adapter",
    "set_active_adapters",
    "supported",
]

__version__ = "0.1.0"

_moved.install()  # old module paths (prefix_hooks.config, ...) resolve until 0.3, with a DeprecationWarning

# A library never configures logging: records go nowhere unless the application sets up handlers
# (e.g. ``logging.basicConfig(level=logging.INFO)``).
logging.getLogger(__name__).addHandler(logging.NullHandler())

# A transformers newer than the newest release tested gets one warning naming both versions
# and the self-check (``python -m prefix_hooks.check``).
_transformers_compat.check_installed_version()
