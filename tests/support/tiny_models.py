"""Tiny, seeded causal LMs of the llama-like families, gpt2, gpt_neox and opt (the inline-attention
decoders are ``tiny_inline``'s), built from the self-check's configs (:mod:`prefix_hooks.check.tiny_models`;
no hub) with the attention implementation a test asks for."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prefix_hooks.check.tiny_models import DECODERS, VOCAB

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    family: DECODERS[family] for family in (*_LLAMA_LIKE, "gpt2", "gpt_neox", "opt")
}
# the tests' gemma3 keeps transformers' default layer pattern: both tiny layers slide (window 64)
FAMILY_CONFIGS["gemma3_text"] = {key: value for key, value in DECODERS["gemma3_text"].items() if key != "layer_types"}

FAMILIES = tuple(FAMILY_CONFIGS)
EAGER_ONLY = frozenset({"gemma2"})  # transformers refuses sdpa for gemma2


def implementations(family: str) -> tuple[str, ...]:
    """Attention backends a family's tiny model can be built with on CPU."""
    return ("eager",) if family in EAGER_ONLY else ("eager", "sdpa")


def family_backend_pairs() -> list[tuple[str, str]]:
    return [(family, impl) for family in FAMILIES for impl in implementations(family)]


def build_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A freshly initialised causal LM of ``family`` in eval mode, float32, deterministic."""
    if attn_implementation == "sdpa" and family in EAGER_ONLY:
        attn_implementation = "eager"
    config = AutoConfig.for_model(family, **{**FAMILY_CONFIGS[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def random_batch(batch: int, length: int, seed: int = 0, left_pad: list[int] | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` avoiding special tokens and an ``attention_mask`` with optional left padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(left_pad or []):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
