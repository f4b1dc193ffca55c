"""Tiny, seeded models of the inline-attention families: falcon, gptj, codegen, gpt_neo, bloom, mpt, built
from the self-check's configs (:mod:`prefix_hooks.check.tiny_models`).

``FAMILIES``/``build``/``example_inputs`` serve the coverage matrix (one default variant per
model type); ``VARIANTS``/``build_variant`` add the configurations these families differ by
(falcon's multi-query, grouped, full and alibi attention, parallel or sequential; a gpt_neo
window shorter than the test sequences). Dropout is off everywhere so training tests are
deterministic. ``feed_chunks`` (``shared_fixtures``') feeds a sequence chunk by chunk into a cache.
"""

from __future__ import annotations

from typing import Any

import torch
from shared_fixtures import feed_chunks  # noqa: F401  (the inline-cache tests import it from here)
from tiny_models import random_batch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prefix_hooks.check.tiny_models import DECODERS
from prefix_hooks.check.tiny_models import VARIANTS as CHECK_VARIANTS

_FALCON = DECODERS["falcon"]  # multi-query (one kv head), rotary, parallel attention
_FALCON_GQA = CHECK_VARIANTS["falcon"]["gqa"]

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "falcon": ("falcon", _FALCON),
    "falcon_mha": ("falcon", {**_FALCON, "multi_query": False}),  # one kv head per query head
    "falcon_gqa": ("falcon", {**_FALCON, **_FALCON_GQA}),
    "falcon_alibi": ("falcon", {**_FALCON, **CHECK_VARIANTS["falcon"]["alibi"]}),
    # grouped kv heads with alibi, as the Falcon2-style checkpoints with alibi are laid out
    "falcon_gqa_alibi": ("falcon", {**_FALCON, **_FALCON_GQA, "alibi": True}),
    "gptj": ("gptj", DECODERS["gptj"]),
    "codegen": ("codegen", DECODERS["codegen"]),
    "gpt_neo": ("gpt_neo", DECODERS["gpt_neo"]),  # layer 0 global, layer 1 local (window longer than any test sequence)
    "gpt_neo_window": ("gpt_neo", {**DECODERS["gpt_neo"], "window_size": 6}),  # a window the prefix falls out of
    "bloom": ("bloom", DECODERS["bloom"]),
    "mpt": ("mpt", DECODERS["mpt"]),
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
