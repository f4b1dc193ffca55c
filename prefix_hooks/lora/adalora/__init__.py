"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose ranks are allocated during training, attached in place.

A LoRA variant, so it lives inside the LoRA package and reuses its machinery (swaps, layers,
merging); see ``docs/adalora.md``.
"""

# ruff: noqa: F401  (re-exports)
from prefix_hooks.core.compose import register_method
from prefix_hooks.lora.adalora.allocator import RankAllocator
from prefix_hooks.lora.adalora.attachment import AdaLoraAttachment, attach_adalora
from prefix_hooks.lora.adalora.callback import AdaLoraCallback
from prefix_hooks.lora.adalora.config import AdaLoraConfig
from prefix_hooks.lora.adalora.layers import SvdConv1D, SvdLayer, SvdLinear, wrap_svd_module
from prefix_hooks.lora.adalora.orthogonal import orthogonal_penalty
from prefix_hooks.lora.adalora.targets import ADALORA_TARGET_MODULES

# before LoraConfig's registration (prefix_hooks.lora imports this package first): attach() takes the
# first registered config class a config is an instance of, and an AdaLoraConfig is a LoraConfig
register_method(AdaLoraConfig, attach_adalora)
