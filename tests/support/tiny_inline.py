"""Tiny, seeded models of the inline-attention families: falcon, gptj, codegen, gpt_neo, bloom, mpt.

``FAMILIES``/``build``/``example_inputs`` serve the coverage matrix (one default variant per
model type); ``VARIANTS``/``build_variant`` add the configurations these families differ by
(falcon's multi-query, grouped, full and alibi attention, parallel or sequential; a gpt_neo
window shorter than the test sequences). Dropout is off everywhere so training tests are
deterministic. ``feed_chunks`` passes the cache under the keyword the installed transformers
takes (``cache`` since 5.24, ``past_key_values`` before), never a deprecated one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tiny_models import VOCAB, random_batch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters

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
    # grouped kv heads with alibi, as the Falcon2-style checkpoints with alibi are laid out
    "falcon_gqa_alibi": ("falcon", {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2, "alibi": True}),
    "gptj": ("gptj", _GPTJ_LIKE),
    "codegen": ("codegen", {**_GPTJ_LIKE, "n_ctx": 256}),
    "gpt_neo": ("gpt_neo", _GPT_NEO),  # layer 0 global, layer 1 local (window longer than any test sequence)
    "gpt_neo_window": ("gpt_neo", {**_GPT_NEO, "window_size": 6}),  # a window the prefix falls out of
    "bloom": ("bloom", dict(hidden_size=32, n_layer=2, n_head=4, attention_dropout=0.0, hidden_dropout=0.0, **_IDS)),
    "mpt": ("mpt", dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, use_cache=True, **_IDS)),
}

def _backends(model_type: str) -> tuple[str, ...]:
    """``eager``, plus ``sdpa`` where the installed transformers builds the family with it (falcon on
    every release; gptj and codegen since they moved onto the attention registry in 5.24)."""
    config = AutoConfig.for_model(model_type, **VARIANTS[model_type][1])
    try:
        AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # "does not support an attention implementation through torch.nn.functional.sdpa"
        return ("eager",)
    return ("eager", "sdpa")


FAMILIES: dict[str, tuple[str, ...]] = {
    model_type: _backends(model_type) for model_type in ("falcon", "gptj", "codegen", "gpt_neo", "bloom", "mpt")
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


def cache_kwargs(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` under the keyword ``model.forward`` takes (``cache`` or ``past_key_values``)."""
    keyword = cache_keyword(forward_parameters(model))
    assert keyword is not None, f"{type(model).__name__}.forward takes no cache"
    return {keyword: cache}


def feed_chunks(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    plan: list[int],
    cache: Any,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` chunk by chunk (sizes ``plan``) into ``cache``; the logits of all positions ``(B, T, V)``."""
    logits = []
    start = 0
    for size in plan:
        end = start + size
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]  # (B, past + chunk)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, start:end]  # (B, chunk)
        out = model(input_ids=input_ids[:, start:end], use_cache=True, **cache_kwargs(model, cache), **kwargs)
        logits.append(out.logits)
        if after_chunk is not None:
            after_chunk(end)
        start = end
    return torch.cat(logits, dim=1)  # (B, T, V)
