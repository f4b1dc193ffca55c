"""Caching, padding and backends behave with a prefix on the inline-attention families.

The same properties as ``test_cache_consistency`` (which see), over ``tiny_inline``'s variants:

* chunked prefill + token-by-token decoding == one forward, and the cache holds exactly
  what the base model's cache holds (never the prefix);
* greedy ``generate`` with a cache == without one, and the returned cache holds the real
  tokens only; ``StaticCache`` == ``DynamicCache``;
* each row of a padded batch == that row alone (forward and ``generate``);
* eager == sdpa (falcon; gptj and codegen where they build with sdpa, since 5.24).

The cache goes in under the keyword the installed transformers takes (``tiny_inline.feed_chunks``).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_cache_consistency import (
    BACKEND_ATOL,
    CACHE_ATOL,
    assert_prefix_matters,
    assert_same_generation,
    attached_prefix,
    cached_shapes,
    chunk_plans,
    draw_case,
    greedy,
    prefix_lengths,
    real_positions,
    seeds,
    step_logits,
)
from tiny_inline import VARIANTS, build_variant, feed_chunks, variant_backend_pairs
from tiny_models import random_batch
from transformers import DynamicCache, PreTrainedModel

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import ALIBI_KEYWORD, alibi_enabled, forward_parameters, output_cache
from prefix_hooks.families import adapter_for

PAD_INVARIANT = tuple(variant for variant in VARIANTS if variant != "gpt_neo_window")  # its window counts pad slots
RIGHT_PADDED = frozenset({"mpt"})  # MPT's alibi has no batch axis: left pads sit between prefix and tokens
GENERATE_VARIANTS = (
    "falcon", "falcon_mha", "falcon_gqa", "falcon_alibi", "falcon_gqa_alibi",
    "gptj", "codegen", "gpt_neo", "bloom", "mpt",
)


def takes_positions(model: PreTrainedModel) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def position_kwargs(model: PreTrainedModel, position_ids: torch.Tensor | None) -> dict[str, Any]:
    return {"position_ids": position_ids} if position_ids is not None and takes_positions(model) else {}


# --- 1. chunked prefill + decoding == one forward --------------------------------------
@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs())
@given(data=st.data())
def test_inline_chunked_prefill_and_decoding_equal_one_forward(variant: str, impl: str, data: st.DataObject) -> None:
    plan = data.draw(chunk_plans(), label="plan")
    length = sum(plan)
    padded = data.draw(st.booleans(), label="padded")
    pad = data.draw(st.integers(1, min(3, length - 1)), label="pad of row 1") if padded and length > 1 else 0
    num_virtual_tokens = data.draw(prefix_lengths, label="P")
    offset = data.draw(st.sampled_from([None, 0]), label="position_offset")
    seed = data.draw(seeds, label="seed")

    model = build_variant(variant, impl, seed)
    batch = random_batch(2, length, seed=seed, left_pad=[0, pad])
    input_ids = batch["input_ids"]
    attention_mask = batch["attention_mask"] if pad else None
    position_ids = real_positions(batch["attention_mask"]) if pad and takes_positions(model) else None
    real = batch["attention_mask"].bool()

    with attached_prefix(model, num_virtual_tokens, offset, seed) as handle, torch.no_grad():

        def full_forward() -> torch.Tensor:
            return model(input_ids=input_ids, attention_mask=attention_mask, **position_kwargs(model, position_ids)).logits

        full = full_forward()  # (B, T, V)
        assert_prefix_matters(handle, full[real], lambda: full_forward()[real])

        base_cache = DynamicCache(config=model.config)
        with handle.disabled():
            feed_chunks(model, input_ids, plan, base_cache, attention_mask, position_ids)

        cache = DynamicCache(config=model.config)

        def check_cache(fed: int) -> None:
            assert cache.get_seq_length() == fed, "the cache must count real tokens only, never the prefix"

        chunked = feed_chunks(model, input_ids, plan, cache, attention_mask, position_ids, after_chunk=check_cache)

    torch.testing.assert_close(chunked[real], full[real], rtol=0, atol=CACHE_ATOL)
    assert cached_shapes(cache) == cached_shapes(base_cache), "the cache must hold what the base model's holds"


# --- 2. generate with a cache == without ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs(GENERATE_VARIANTS))
@given(data=st.data())
def test_inline_greedy_generate_with_cache_equals_without(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=3)
    pads = case.pads if variant not in RIGHT_PADDED else [0, 0, 0]
    model = build_variant(variant, impl, case.seed)
    batch = random_batch(3, case.length, seed=case.seed, left_pad=pads)
    with attached_prefix(model, case.num_virtual_tokens, case.offset, case.seed) as handle, torch.no_grad():
        cached = greedy(model, batch, case.new_tokens, use_cache=True)
        uncached = greedy(model, batch, case.new_tokens, use_cache=False)
        assert_prefix_matters(handle, step_logits(cached), lambda: step_logits(greedy(model, batch, case.new_tokens)))
    assert_same_generation(cached, uncached)
    # the last token is generated but never fed back: the cache holds prompt + new - 1 real tokens
    assert output_cache(cached).get_seq_length() == case.length + case.new_tokens - 1


@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_inline_beam_search_with_cache_equals_without(variant: str) -> None:
    """Beam search reorders the real cache between steps; the prefix must follow every beam."""
    model = build_variant(variant, "eager")
    batch = random_batch(2, 6, seed=1, left_pad=[0, 2])
    beams: dict[str, Any] = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with attached_prefix(model, 3, None, seed=0), torch.no_grad():
        cached = model.generate(**batch, **beams, use_cache=True)  # type: ignore[operator]
        uncached = model.generate(**batch, **beams, use_cache=False)  # type: ignore[operator]
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


# --- 2b. StaticCache == DynamicCache ------------------------------------------------------
# Not compared: falcon_alibi (the base model's static-cache generate fails) and gpt_neo_window
# (the base model's window slices its bias by the static cache's length and disagrees by itself).
STATIC_VARIANTS = ("falcon", "falcon_mha", "falcon_gqa", "gptj", "codegen", "gpt_neo", "bloom", "mpt")


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs(STATIC_VARIANTS))
@given(data=st.data())
def test_inline_generate_static_cache_equals_dynamic(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2, allow_unpadded=True)
    model = build_variant(variant, impl, case.seed)
    batch = random_batch(2, case.length, seed=case.seed, left_pad=case.pads)
    try:
        with torch.no_grad():
            greedy(model, batch, case.new_tokens, use_cache=True, cache_implementation="static")
    except ValueError as base_error:  # the base model's own StaticCache bug (bloom on transformers 5.18)
        with attached_prefix(model, case.num_virtual_tokens, case.offset, case.seed), torch.no_grad():
            with pytest.raises(type(base_error), match=re.escape(str(base_error))):
                greedy(model, batch, case.new_tokens, use_cache=True, cache_implementation="static")
        return
    with attached_prefix(model, case.num_virtual_tokens, case.offset, case.seed) as handle, torch.no_grad():
        dynamic = greedy(model, batch, case.new_tokens, use_cache=True)
        static = greedy(model, batch, case.new_tokens, use_cache=True, cache_implementation="static")
        assert_prefix_matters(handle, step_logits(static), lambda: step_logits(greedy(model, batch, case.new_tokens)))
    assert_same_generation(static, dynamic)


# --- 3. a padded row == the row alone ---------------------------------------------------
def _pad(batch: dict[str, torch.Tensor], pads: list[int], right: bool) -> dict[str, torch.Tensor]:
    """Move each row's left pads to the right (MPT)."""
    if not right:
        return batch
    return {name: torch.stack([row.roll(-pad) for row, pad in zip(value, pads)]) for name, value in batch.items()}


@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs(PAD_INVARIANT))
@given(data=st.data())
def test_inline_padded_rows_equal_rows_alone(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=3)
    length, pads, seed = case.length, case.pads, case.seed
    right = variant in RIGHT_PADDED
    model = build_variant(variant, impl, seed)
    batch = _pad(random_batch(3, length, seed=seed, left_pad=pads), pads, right)
    position_ids = real_positions(batch["attention_mask"])
    with attached_prefix(model, case.num_virtual_tokens, case.offset, seed), torch.no_grad():
        logits = model(**batch, **position_kwargs(model, position_ids)).logits  # (B, T, V)
        for row, pad in enumerate(pads):
            real = batch["attention_mask"][row].bool()
            alone = model(input_ids=batch["input_ids"][row : row + 1, real]).logits  # (1, T - pad, V)
            torch.testing.assert_close(logits[row : row + 1, real], alone, rtol=0, atol=CACHE_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs(tuple(v for v in GENERATE_VARIANTS if v != "mpt")))
@given(data=st.data())
def test_inline_generate_padded_rows_equal_rows_alone(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2)
    length, pads, seed = case.length, case.pads, case.seed
    model = build_variant(variant, impl, seed)
    batch = random_batch(2, length, seed=seed, left_pad=pads)
    with attached_prefix(model, case.num_virtual_tokens, case.offset, seed), torch.no_grad():
        together = greedy(model, batch, case.new_tokens)
        for row, pad in enumerate(pads):
            alone = greedy(model, {name: value[row : row + 1, pad:] for name, value in batch.items()}, case.new_tokens)
            torch.testing.assert_close(together.sequences[row, length:], alone.sequences[0, length - pad :], rtol=0, atol=0)


# --- 4. eager == sdpa -------------------------------------------------------------------
@functools.cache
def base_backend_difference(variant: str) -> float:
    """Without any prefix: how far the base model's eager and sdpa logits lie apart (real tokens)."""
    batch = random_batch(2, 7, seed=1, left_pad=[0, 3])
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = build_variant(variant, "eager")(**batch).logits[real]
        sdpa = build_variant(variant, "sdpa")(**batch).logits[real]
    return float((eager - sdpa).abs().max())


def adds_alibi_twice(variant: str) -> bool:
    """Falcon's inline attention (transformers <= 5.23) takes ``alibi`` and, on its eager path, adds it on
    top of the mask that already holds it; sdpa adds it once. 5.25's registry attention has no ``alibi``."""
    model = build_variant(variant, "eager")
    return any(
        alibi_enabled(site.module) and ALIBI_KEYWORD in forward_parameters(site.module)
        for site in adapter_for(model).attention_sites(model)
    )


SDPA_VARIANTS = [variant for variant, impl in variant_backend_pairs() if impl == "sdpa"]


@pytest.mark.parametrize("variant", SDPA_VARIANTS)
def test_inline_base_backends_agree_unless_eager_adds_alibi_twice(variant: str) -> None:
    """Guard for the comparison below: without a prefix the base model's eager and sdpa agree within
    ``BACKEND_ATOL``, except where eager adds falcon's alibi twice (there the prefix cannot be judged by
    comparing backends, and the comparison is left to the other oracles: prompt, PEFT, hand-written)."""
    if adds_alibi_twice(variant):
        assert base_backend_difference(variant) > 10 * BACKEND_ATOL
    else:
        assert base_backend_difference(variant) <= BACKEND_ATOL


@pytest.mark.parametrize("variant", [v for v in SDPA_VARIANTS if not adds_alibi_twice(v)])
@given(data=st.data())
def test_inline_eager_and_sdpa_agree(variant: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2, allow_unpadded=True)
    batch = random_batch(2, case.length, seed=case.seed, left_pad=case.pads)
    real = batch["attention_mask"].bool()
    eager_model = build_variant(variant, "eager", case.seed)
    sdpa_model = build_variant(variant, "sdpa", case.seed)
    config = PrefixTuningConfig(num_virtual_tokens=case.num_virtual_tokens, position_offset=case.offset)
    with (
        attached_prefix(eager_model, case.num_virtual_tokens, case.offset, case.seed) as eager,
        attach_prefix(sdpa_model, config) as sdpa,
        torch.no_grad(),
    ):
        sdpa.encoder.load_state_dict(eager.encoder.state_dict())
        eager_logits = eager_model(**batch).logits  # (B, T, V)
        sdpa_logits = sdpa_model(**batch).logits
        assert_prefix_matters(eager, eager_logits[real], lambda: eager_model(**batch).logits[real])
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], rtol=0, atol=BACKEND_ATOL)
