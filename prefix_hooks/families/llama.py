"""Llama: attention through the transformers registry, grouped-query keys/values."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="llama",
    model_types=("llama",),
    attention_classes=("LlamaAttention",),
)
