"""Phi-3: a fused qkv projection, grouped-query keys/values."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="phi3",
    model_types=("phi3",),
    attention_classes=("Phi3Attention",),
)
