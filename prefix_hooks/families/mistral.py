"""Mistral: Llama's attention with sliding-window masks (the prefix is always visible)."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="mistral",
    model_types=("mistral",),
    attention_classes=("MistralAttention",),
)
