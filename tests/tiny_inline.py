"""Tiny, seeded models of the inline-attention families: falcon, gptj, codegen, gpt_neo, bloom, mpt.

``FAMILIES``/``build``/``example_inputs`` serve the coverage matrix (one default variant per
model type); ``VARIANTS``/``build_variant`` add the configurations these families differ by
(falcon's multi-query, grouped, full and alibi attention; a gpt_neo window shorter than the
test sequences). Dropout is off everywhere so training tests are deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import VOCAB, random_batch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": VOCAB}
_FALCON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
    attention_dropout=0.0, hidden_dropout=0.0, **_IDS,
)
_GPTJ_LIKE = dict(  # gptj and codegen: rotary on 4 of each head's 8 features
    n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0, **_IDS,
)
_GPT_NEO = dict(
    hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=256,
    max_position_embeddings=256, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **_IDS,
)

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "falcon": ("falcon", _FALCON),  # multi-query (one kv head), rotary, parallel attention
    "falcon_mha": ("falcon", {**_FALCON, "multi_query": False}),  # one kv head per query head
    "falcon_gqa": ("falcon", {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon_alibi": ("falcon", {**_FALCON, "alibi": True, "multi_query": False, "parallel_attn": False}),
    "gptj": ("gptj", _GPTJ_LIKE),
    "codegen": ("codegen", {**_GPTJ_LIKE, "n_ctx": 256}),
    "gpt_neo": ("gpt_neo", _GPT_NEO),  # layer 0 global, layer 1 local (window longer than any test sequence)
    "gpt_neo_window": ("gpt_neo", {**_GPT_NEO, "window_size": 6}),  # a window the prefix falls out of
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.0, hidden_dropout=0.0, **_IDS)),
    "mpt": ("mpt", dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, use_cache=True, **_IDS)),
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "falcon": ("eager", "sdpa"),
    "gptj": ("eager",),
    "codegen": ("eager",),
    "gpt_neo": ("eager",),
    "bloom": ("eager",),
    "mpt": ("eager",),
}
"""model_type -> attention implementations its tiny model builds with on CPU."""


def implementations(variant: str) -> tuple[str, ...]:
    """Attention backends a variant builds with."""
    return FAMILIES[VARIANTS[variant][0]]


def variant_backend_pairs(variants: tuple[str, ...] = tuple(VARIANTS)) -> list[tuple[str, str]]:
    return [(variant, impl) for variant in variants for impl in implementations(variant)]


def build_variant(variant: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A freshly initialised causal LM of ``variant`` in eval mode, float32 (``sdpa`` falls back to
    ``eager`` where the family has no sdpa)."""
    model_type, config_kwargs = VARIANTS[variant]
    if attn_implementation not in FAMILIES[model_type]:
        attn_implementation = "eager"
    config = AutoConfig.for_model(model_type, **{**config_kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def build(model_type: str, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """The default tiny model of ``model_type`` (falcon: multi-query)."""
    return build_variant(model_type, attn_implementation, seed)


def example_inputs(model_type: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` of length 7, row 1 left-padded by 2 (when ``batch > 1``)."""
    return random_batch(batch, 7, seed=seed, left_pad=[0, 2][:batch])
