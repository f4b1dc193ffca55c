"""Tiny, seeded models of every supported family, built from configs (no hub)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 96
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256, **_IDS,
)

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": 64},
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},  # explicit head_dim != hidden / heads
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "gemma2": {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 64},
    "gemma3_text": {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 64},
    "phi3": _LLAMA_LIKE,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, **_IDS),
    "gpt_neox": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=256, **_IDS,
    ),
    "opt": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
        word_embed_proj_dim=32, max_position_embeddings=256, **_IDS,
    ),
}

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
