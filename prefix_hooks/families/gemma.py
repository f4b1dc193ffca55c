"""Gemma 1/2/3 (text): Llama-style attention; Gemma2 is eager-only, Gemma3 mixes sliding and full layers."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="gemma",
    model_types=("gemma", "gemma2", "gemma3_text"),
    attention_classes=("GemmaAttention", "Gemma2Attention", "Gemma3Attention"),
)
