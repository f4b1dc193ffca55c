"""LoRA (Hu et al., 2021) attached in place: target layers are swapped for LoRA layers and put back on detach.

Helpers of this package append their exports below, one import line each.
"""

# ruff: noqa: F401  (re-exports)
from prefix_hooks.core.compose import register_method
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.rows import BASE_ROW, adapter_rows_context, current_adapter_rows
from prefix_hooks.core.switch import Switch
from prefix_hooks.lora.activation import active_adapters, adapter_rows, set_active_adapters
from prefix_hooks.lora.adalora import AdaLoraAttachment, AdaLoraCallback, AdaLoraConfig, attach_adalora
from prefix_hooks.lora.attachment import LoraAttachment, attach_lora
from prefix_hooks.lora.config import LoraConfig
from prefix_hooks.lora.layers import LoraConv1D, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, wrap_module
from prefix_hooks.lora.targets import DEFAULT_TARGET_MODULES, select_modules_to_save, select_targets

register_method(LoraConfig, attach_lora)
