"""Qwen2: Llama-style attention with biased projections."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="qwen2",
    model_types=("qwen2",),
    attention_classes=("Qwen2Attention",),
)
