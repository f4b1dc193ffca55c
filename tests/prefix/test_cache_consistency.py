"""A prefix must not change how caching, padding or the attention backend behave.

Every property compares two ways of computing the same thing with the prefix
attached, so the prefix's own values never matter (they are random, normal init):

* chunked prefill + token-by-token decoding into a ``DynamicCache`` == one forward,
  and the cache holds exactly what the base model's cache holds (never the prefix);
* greedy ``generate`` with a cache == without one;
* ``StaticCache`` == ``DynamicCache`` (``generate`` and a plain prefill that takes
  sdpa's ``mask=None`` top-left causal path);
* each row of a left-padded batch == that row alone;
* eager == sdpa.

Models are built inside each example (a tiny model takes a few milliseconds), so every
example attaches and detaches its own prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from shared_fixtures import cache_kwargs, feed_chunks
from tiny_models import build_model, family_backend_pairs, implementations, random_batch
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

CACHE_ATOL = 1e-5  # same maths, different kernels/shapes: float32 round-off only
BACKEND_ATOL = 1e-4  # eager vs sdpa: different reduction orders
PAD_TOKEN_ID = 0  # tiny_models' pad id
MIN_PREFIX_EFFECT = 1e-3  # the prefix must move logits by more than this, or a test proves nothing

GEMMA3_MIXED = {"layer_types": ["sliding_attention", "full_attention"]}
# Model variants beyond the plain families: sliding windows shorter than the sequences drawn below.
WINDOWED: dict[str, tuple[str, dict[str, Any]]] = {
    "mistral-window4": ("mistral", {"sliding_window": 4}),
    "gemma3-window4-mixed": ("gemma3_text", {**GEMMA3_MIXED, "sliding_window": 4}),
}

MASK_POSITIONED = frozenset({"opt"})  # families whose default positions skip left padding
GENERATE_VARIANTS = ("llama", "gpt2", "gemma3_text", "opt", "gpt_neox")
STATIC_VARIANTS = ("llama", "gemma3_text", "gemma3-window4-mixed")


def _family_and_overrides(variant: str) -> tuple[str, dict[str, Any]]:
    if variant in WINDOWED:
        return WINDOWED[variant]
    # Gemma3's default pattern makes both tiny layers sliding; mix in a full-attention layer.
    return variant, GEMMA3_MIXED if variant == "gemma3_text" else {}


def build_variant(variant: str, impl: str, seed: int) -> PreTrainedModel:
    """A tiny model of a family (Gemma3 with one sliding and one full layer) or a ``WINDOWED`` variant."""
    family, overrides = _family_and_overrides(variant)
    return build_model(family, impl, seed=seed, **overrides)


def _pairs(variants: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(variant, attn_implementation)`` for every backend the variant's family builds with."""
    return [(variant, impl) for variant in variants for impl in implementations(_family_and_overrides(variant)[0])]


# --- strategies -------------------------------------------------------------------
prefix_lengths = st.integers(min_value=1, max_value=5)
# None: PEFT's convention (real tokens start at position P); 0: the model's own positions.
position_offsets = st.sampled_from([None, 0])
seeds = st.integers(min_value=0, max_value=2**16)


@dataclass(frozen=True)
class DrawnCase:
    """One example's shared draws: sequence length, left pads per row, new tokens, P, offset, seed."""

    length: int
    pads: list[int]
    new_tokens: int
    num_virtual_tokens: int
    offset: int | None
    seed: int


def draw_case(data: st.DataObject, rows: int, *, allow_unpadded: bool = False) -> DrawnCase:
    length = data.draw(st.integers(2, 8), label="length")
    pad_strategy = left_pads(rows, length)
    if allow_unpadded:
        pad_strategy = st.one_of(st.just([0] * rows), pad_strategy)
    return DrawnCase(
        length=length,
        pads=data.draw(pad_strategy, label="left pads"),
        new_tokens=data.draw(st.integers(1, 5), label="max_new_tokens"),
        num_virtual_tokens=data.draw(prefix_lengths, label="P"),
        offset=data.draw(position_offsets, label="position_offset"),
        seed=data.draw(seeds, label="seed"),
    )


@st.composite
def chunk_plans(draw: st.DrawFn) -> list[int]:
    """Chunk sizes: a prefill split at random boundaries, then single-token decode steps."""
    prefill = draw(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4))
    decode = draw(st.integers(min_value=0, max_value=4))
    return prefill + [1] * decode


@st.composite
def left_pads(draw: st.DrawFn, batch: int, length: int, max_pad: int = 4) -> list[int]:
    """Left-padding per row; every row keeps at least one real token."""
    return draw(st.lists(st.integers(0, min(max_pad, length - 1)), min_size=batch, max_size=batch))


# --- helpers ------------------------------------------------------------------------
@contextmanager
def attached_prefix(
    model: PreTrainedModel, num_virtual_tokens: int, position_offset: int | None, seed: int
) -> Iterator[PrefixAttachment]:
    """Attach a prefix whose weights are drawn from N(0, 1), so it moves the logits."""
    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, position_offset=position_offset)
    with attach_prefix(model, config) as handle:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            torch.nn.init.normal_(handle.encoder.embedding.weight, generator=generator)
        yield handle


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that left padding does not advance: ``(B, T)``, pads clamped to 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def assert_prefix_matters(handle: PrefixAttachment, logits: torch.Tensor, forward: Callable[[], torch.Tensor]) -> None:
    """Fail if ``logits`` (computed with the prefix) equal the base model's ``forward()``."""
    with handle.disabled():
        base = forward()
    difference = (logits - base).abs().max().item()
    assert difference > MIN_PREFIX_EFFECT, f"the prefix changed logits by only {difference:.2e}; the test is vacuous"


def cached_shapes(cache: DynamicCache) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer, the shapes of the cached keys and values: ``(B, kv_heads, S, D)`` each."""
    shapes = []
    for layer in cast(list[DynamicLayer], cache.layers):  # full or sliding-window layers, both DynamicLayer
        assert layer.keys is not None and layer.values is not None, "a cache layer was never written"
        shapes.append((tuple(layer.keys.shape), tuple(layer.values.shape)))
    return shapes


def greedy(model: PreTrainedModel, batch: dict[str, torch.Tensor], max_new_tokens: int, **kwargs: Any) -> Any:
    """Greedy ``generate`` of exactly ``max_new_tokens``, returning sequences and raw step logits."""
    generate: Callable[..., Any] = model.generate  # type: ignore[assignment]  # mixed in by *ForCausalLM
    return generate(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # eos must not end rows early: compare every step
        pad_token_id=PAD_TOKEN_ID,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def step_logits(generated: Any) -> torch.Tensor:
    """The raw logits of every generation step: ``(steps, B, V)``."""
    return torch.stack(generated.logits)


def assert_same_generation(actual: Any, expected: Any) -> None:
    """Same tokens exactly, and step logits within ``CACHE_ATOL``."""
    torch.testing.assert_close(actual.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(step_logits(actual), step_logits(expected), rtol=0, atol=CACHE_ATOL)


# --- 1. chunked prefill + decoding == one forward --------------------------------------
@pytest.mark.parametrize(
    ("variant", "impl"),
    [*family_backend_pairs(), *(pytest.param(*pair, marks=pytest.mark.slow) for pair in _pairs(tuple(WINDOWED)))],
)
@given(data=st.data())
def test_chunked_prefill_and_decoding_equal_one_forward(variant: str, impl: str, data: st.DataObject) -> None:
    plan = data.draw(chunk_plans(), label="plan")
    length = sum(plan)
    padded = data.draw(st.booleans(), label="padded")  # unpadded half the time: positions from the cache
    pad = data.draw(st.integers(1, min(3, length - 1)), label="pad of row 1") if padded and length > 1 else 0
    num_virtual_tokens = data.draw(prefix_lengths, label="P")
    offset = data.draw(position_offsets, label="position_offset")
    seed = data.draw(seeds, label="seed")

    model = build_variant(variant, impl, seed)
    batch = random_batch(2, length, seed=seed, left_pad=[0, pad])
    input_ids = batch["input_ids"]
    # Without padding, let the model (and the offset hook) derive positions from the cache.
    attention_mask = batch["attention_mask"] if pad else None
    position_ids = real_positions(batch["attention_mask"]) if pad else None
    real = batch["attention_mask"].bool()  # (B, T), compare where tokens are real

    with attached_prefix(model, num_virtual_tokens, offset, seed) as handle, torch.no_grad():

        def full_forward() -> torch.Tensor:
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

        full = full_forward()  # (B, T, V)
        assert_prefix_matters(handle, full[real], lambda: full_forward()[real])

        # The base model's own cache, fed the same chunks, says what the cache must hold.
        base_cache = DynamicCache(config=model.config)
        with handle.disabled():
            feed_chunks(model, input_ids, plan, base_cache, attention_mask, position_ids)

        cache = DynamicCache(config=model.config)

        def check_cache(fed: int) -> None:
            assert cache.get_seq_length() == fed, "the cache must count real tokens only, never the prefix"
            assert len(cache.layers) == model.config.num_hidden_layers

        chunked = feed_chunks(model, input_ids, plan, cache, attention_mask, position_ids, after_chunk=check_cache)

    torch.testing.assert_close(chunked[real], full[real], rtol=0, atol=CACHE_ATOL)
    assert cache.get_seq_length() == base_cache.get_seq_length() == length
    assert cached_shapes(cache) == cached_shapes(base_cache), "the cache must hold what the base model's holds"


# --- 2. generate with a cache == without ------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "impl"), _pairs(GENERATE_VARIANTS))
@given(data=st.data())
def test_greedy_generate_with_cache_equals_without(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=3)
    length, pads, seed = case.length, case.pads, case.seed
    new_tokens = case.new_tokens
    num_virtual_tokens, offset = case.num_virtual_tokens, case.offset

    model = build_variant(variant, impl, seed)
    batch = random_batch(3, length, seed=seed, left_pad=pads)
    with attached_prefix(model, num_virtual_tokens, offset, seed) as handle, torch.no_grad():
        cached = greedy(model, batch, new_tokens, use_cache=True)
        uncached = greedy(model, batch, new_tokens, use_cache=False)
        assert_prefix_matters(handle, step_logits(cached), lambda: step_logits(greedy(model, batch, new_tokens)))
    assert_same_generation(cached, uncached)


# --- 3. StaticCache == DynamicCache -----------------------------------------------------
@pytest.mark.parametrize(("variant", "impl"), _pairs(STATIC_VARIANTS))
@given(data=st.data())
def test_generate_static_cache_equals_dynamic(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2, allow_unpadded=True)
    length, pads, seed = case.length, case.pads, case.seed
    new_tokens = case.new_tokens
    num_virtual_tokens, offset = case.num_virtual_tokens, case.offset

    model = build_variant(variant, impl, seed)
    batch = random_batch(2, length, seed=seed, left_pad=pads)
    with attached_prefix(model, num_virtual_tokens, offset, seed) as handle, torch.no_grad():
        dynamic = greedy(model, batch, new_tokens, use_cache=True)
        static = greedy(model, batch, new_tokens, use_cache=True, cache_implementation="static")
        assert_prefix_matters(handle, step_logits(static), lambda: step_logits(greedy(model, batch, new_tokens)))
    assert_same_generation(static, dynamic)


@contextmanager
def recording_sdpa_masks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bool, int, int]]]:
    """Record ``(mask is None, q_len, kv_len)`` for each sdpa call the model makes."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen: list[tuple[bool, int, int]] = []

    def spy(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        seen.append((attention_mask is None, query.shape[2], key.shape[2]))
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", spy)  # removed again on exit
        yield seen


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_static_prefill_reaches_sdpa_without_a_mask(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the next test: the base model really takes sdpa's ``mask=None`` path with keys
    longer than the query (top-left causal) when prefilling an empty StaticCache."""
    model = build_variant(variant, "sdpa", 0)
    input_ids = random_batch(2, 6)["input_ids"]
    cache = StaticCache(config=model.config, max_cache_len=10)
    with recording_sdpa_masks(monkeypatch) as seen, torch.no_grad():
        model(input_ids=input_ids, **cache_kwargs(model, cache), use_cache=True)
    assert any(no_mask and kv_len > q_len > 1 for no_mask, q_len, kv_len in seen), seen


@pytest.mark.parametrize(("variant", "impl"), _pairs(STATIC_VARIANTS))
@given(data=st.data())
def test_static_cache_prefill_and_decoding_equal_one_forward(variant: str, impl: str, data: st.DataObject) -> None:
    prefill = data.draw(st.integers(1, 8), label="prefill length")
    decode = data.draw(st.integers(0, 4), label="decode steps")
    spare = data.draw(st.integers(0, 6), label="unused cache slots")
    num_virtual_tokens = data.draw(prefix_lengths, label="P")
    offset = data.draw(position_offsets, label="position_offset")
    seed = data.draw(seeds, label="seed")
    length = prefill + decode

    model = build_variant(variant, impl, seed)
    input_ids = random_batch(2, length, seed=seed)["input_ids"]  # unpadded: sdpa gets mask=None
    with attached_prefix(model, num_virtual_tokens, offset, seed) as handle, torch.no_grad():
        full = model(input_ids=input_ids).logits  # (B, T, V)
        assert_prefix_matters(handle, full, lambda: model(input_ids=input_ids).logits)
        cache = StaticCache(config=model.config, max_cache_len=length + spare)
        stepped = feed_chunks(model, input_ids, [prefill] + [1] * decode, cache)
        assert int(cache.get_seq_length()) == length, "the static cache must hold real tokens only"
    torch.testing.assert_close(stepped, full, rtol=0, atol=CACHE_ATOL)


# --- 4. a padded row == the row alone ---------------------------------------------------
@pytest.mark.parametrize(("variant", "impl"), family_backend_pairs())
@given(data=st.data())
def test_padded_rows_equal_rows_alone(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=3)
    length, pads, seed = case.length, case.pads, case.seed
    num_virtual_tokens, offset = case.num_virtual_tokens, case.offset

    model = build_variant(variant, impl, seed)
    batch = random_batch(3, length, seed=seed, left_pad=pads)
    # Most models' default positions ignore left padding (base behaviour), so pass them; OPT's
    # count from the mask, so there the default positions (shifted by the offset) must hold too.
    explicit = variant not in MASK_POSITIONED or data.draw(st.booleans(), label="explicit position_ids")
    position_ids = real_positions(batch["attention_mask"]) if explicit else None
    with attached_prefix(model, num_virtual_tokens, offset, seed), torch.no_grad():
        logits = model(**batch, position_ids=position_ids).logits  # (B, T, V)
        for row, pad in enumerate(pads):
            alone = model(input_ids=batch["input_ids"][row : row + 1, pad:]).logits  # (1, T - pad, V)
            torch.testing.assert_close(logits[row : row + 1, pad:], alone, rtol=0, atol=CACHE_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "impl"), _pairs(GENERATE_VARIANTS))
@given(data=st.data())
def test_generate_padded_rows_equal_rows_alone(variant: str, impl: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2)
    length, pads, seed = case.length, case.pads, case.seed
    new_tokens = case.new_tokens
    num_virtual_tokens, offset = case.num_virtual_tokens, case.offset

    model = build_variant(variant, impl, seed)
    batch = random_batch(2, length, seed=seed, left_pad=pads)
    with attached_prefix(model, num_virtual_tokens, offset, seed), torch.no_grad():
        together = greedy(model, batch, new_tokens)
        for row, pad in enumerate(pads):
            alone = greedy(model, {name: value[row : row + 1, pad:] for name, value in batch.items()}, new_tokens)
            torch.testing.assert_close(
                together.sequences[row, length:], alone.sequences[0, length - pad :], rtol=0, atol=0
            )


# --- 5. eager == sdpa -------------------------------------------------------------------
@pytest.mark.parametrize("variant", [family for family, impl in family_backend_pairs() if impl == "sdpa"])
@given(data=st.data())
def test_eager_and_sdpa_agree(variant: str, data: st.DataObject) -> None:
    case = draw_case(data, rows=2, allow_unpadded=True)
    length, pads, seed = case.length, case.pads, case.seed
    num_virtual_tokens, offset = case.num_virtual_tokens, case.offset

    batch = random_batch(2, length, seed=seed, left_pad=pads)
    if not any(pads):
        del batch["attention_mask"]  # unpadded: sdpa takes its mask=None path
    real = torch.ones(2, length, dtype=torch.bool) if not any(pads) else batch["attention_mask"].bool()
    eager_model = build_variant(variant, "eager", seed)
    sdpa_model = build_variant(variant, "sdpa", seed)
    with (
        attached_prefix(eager_model, num_virtual_tokens, offset, seed) as eager,
        attached_prefix(sdpa_model, num_virtual_tokens, offset, seed + 1) as sdpa,
        torch.no_grad(),
    ):
        sdpa.encoder.load_state_dict(eager.encoder.state_dict())
        eager_logits = eager_model(**batch).logits  # (B, T, V)
        sdpa_logits = sdpa_model(**batch).logits
        assert_prefix_matters(eager, eager_logits[real], lambda: eager_model(**batch).logits[real])
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], rtol=0, atol=BACKEND_ATOL)
