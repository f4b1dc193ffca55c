"""Qwen3: Llama-style attention with an explicit head_dim and q/k norms (applied before the prefix splice)."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="qwen3",
    model_types=("qwen3",),
    attention_classes=("Qwen3Attention",),
)
