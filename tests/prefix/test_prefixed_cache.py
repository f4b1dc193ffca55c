"""Decode steps through a cache whose storage holds the prefix in front (``prefix.prefixed_cache``).

Oracles, all independent of the path under test:

* the same tokens in one uncached forward (the prefix spliced by the prefill's own path);
* the same decode loop with the path switched off (``PrefixedStorage.update`` answering
  ``None``), i.e. the merged or concatenating splice every earlier release used;
* the base model's own ``DynamicCache`` semantics: lengths, ``crop``, continuing after detach;
* the base model's operator count for the same step.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch
from shared_fixtures import cache_kwargs
from tiny_inline import VARIANTS, build_variant
from tiny_models import build_model, random_batch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.prefix import prefixed_cache
from prefix_hooks.prefix.prefixed_cache import PrefixedStorage

ATOL = 1e-5
PROMPT, STEPS = 7, 5


@pytest.fixture(params=["concatenated", "in place"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a layer's storage grows: a concatenation per step (short caches), or writes into spare
    room that runs out every two steps here (long caches; the tiny models' caches are made to count as long)."""
    if request.param == "in place":
        monkeypatch.setattr(prefixed_cache, "INPLACE_FROM", 0)
        monkeypatch.setattr(prefixed_cache, "MIN_SPARE", 2)
        monkeypatch.setattr(prefixed_cache, "SPARE_FRACTION", 10**6)
    else:
        monkeypatch.setattr(prefixed_cache, "INPLACE_FROM", 10**9)
    return str(request.param)


def _attached(family: str = "llama", num_virtual_tokens: int = 4, **overrides: Any) -> tuple[Any, PrefixAttachment]:
    model: Any = build_variant(family, "sdpa", **overrides) if family in VARIANTS else build_model(family, "sdpa", **overrides)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens))
    torch.nn.init.normal_(handle.encoder.embedding.weight)
    return model, handle


@contextmanager
def _counting_steps() -> Iterator[dict[str, int]]:
    """Count the layer updates the prefixed storage serves."""
    update = PrefixedStorage.update
    counts = {"served": 0}

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = update(*args, **kwargs)
        counts["served"] += result is not None
        return result

    PrefixedStorage.update = counting  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        PrefixedStorage.update = update  # type: ignore[method-assign]


@contextmanager
def _storage_off() -> Iterator[dict[str, int]]:
    update = PrefixedStorage.update
    PrefixedStorage.update = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield {"served": 0}
    finally:
        PrefixedStorage.update = update  # type: ignore[method-assign]


def _decode(model: PreTrainedModel, batch: dict[str, torch.Tensor], explicit: bool, cache: DynamicCache,
            start: int = 0) -> torch.Tensor:
    """Prefill ``batch[:, :PROMPT]`` into ``cache`` (unless ``start > 0``: continue from there), then one
    token per step; the logits of every fed position ``(B, T - start, V)``."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    chunks = [(start, PROMPT)] if start == 0 else []
    chunks += [(position, position + 1) for position in range(max(start, PROMPT), input_ids.shape[1])]
    logits = []
    for begin, end in chunks:
        kwargs: dict[str, Any] = {}
        if explicit:
            kwargs["attention_mask"] = mask[:, :end]  # (B, end)
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, begin:end]  # (B, end - begin)
        out = model(input_ids=input_ids[:, begin:end], use_cache=True, **cache_kwargs(model, cache), **kwargs)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _uncached(model: PreTrainedModel, batch: dict[str, torch.Tensor], explicit: bool) -> torch.Tensor:
    mask = batch["attention_mask"]
    kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if explicit else {}
    return model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits  # (B, T, V)


@pytest.mark.parametrize(
    "family",
    ["llama", "qwen3", "mistral", "gpt2", "gpt_neox", "opt", "falcon_gqa", "gptj", "codegen", "gpt_neo", "bloom", "mpt"],
)
@pytest.mark.parametrize("explicit", [False, True], ids=["bare", "mask+positions"])
@torch.no_grad()
def test_decode_steps_match_one_uncached_forward(family: str, explicit: bool, layout: str) -> None:
    model, handle = _attached(family)
    batch = random_batch(2, PROMPT + STEPS, left_pad=[2] if explicit else None)
    layers = len(handle.layer_prefixes())
    with handle, _counting_steps() as counts:
        decoded = _decode(model, batch, explicit, DynamicCache())
        expected = _uncached(model, batch, explicit)
    assert counts["served"] == STEPS * layers  # every step after the prefill, every layer
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(decoded[real], expected[real], atol=ATOL, rtol=ATOL)
    with torch.no_grad():
        assert (_uncached(model, batch, explicit) - expected)[real].abs().max() > 1e-3  # the prefix acts


@torch.no_grad()
def test_the_cache_holds_the_real_tokens_only(layout: str) -> None:
    """Lengths, shapes and contents are those of the decode with the path off; only the storage differs."""
    model, handle = _attached()
    batch = random_batch(2, PROMPT + STEPS)
    with handle:
        stepped, plain = DynamicCache(), DynamicCache()
        logits = _decode(model, batch, False, stepped)
        with _storage_off():
            plain_logits = _decode(model, batch, False, plain)
    torch.testing.assert_close(logits, plain_logits, atol=ATOL, rtol=ATOL)
    assert stepped.get_seq_length() == plain.get_seq_length() == PROMPT + STEPS
    for ours, theirs in zip(cast(list[DynamicLayer], stepped.layers), cast(list[DynamicLayer], plain.layers), strict=True):
        assert ours.keys is not None and ours.values is not None and theirs.keys is not None
        assert ours.keys.shape == theirs.keys.shape == (2, model.config.num_key_value_heads, PROMPT + STEPS, 8)
        torch.testing.assert_close(ours.keys, theirs.keys, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(ours.values, theirs.values, atol=ATOL, rtol=ATOL)
        assert ours.keys.storage_offset() == 4 * 8  # the prefix sits in front, in storage only (P=4, D=8)
        assert theirs.keys.storage_offset() == 0


@torch.no_grad()
def test_crop_and_reorder_then_continue(layout: str) -> None:
    """A cropped or reordered layer is no longer the storage's: the next step rebuilds it, correctly."""
    model, handle = _attached()
    batch = random_batch(2, PROMPT + STEPS)
    with handle:
        cache = DynamicCache()
        _decode(model, batch, False, cache)
        cache.crop(-2)  # drop the last two positions
        cache.reorder_cache(cast(torch.LongTensor, torch.tensor([1, 0])))  # swap the rows, as beam search does
        flipped = {key: value.flip(0) for key, value in batch.items()}
        continued = _decode(model, flipped, False, cache, start=PROMPT + STEPS - 2)
        expected = _uncached(model, flipped, False)[:, -2:]
    torch.testing.assert_close(continued, expected, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_after_detach_the_base_model_continues_the_same_cache(layout: str) -> None:
    """The layers hold plain prefix-free tensors after detach: the base model's next step on them equals
    its step on a contiguous copy of the same entries."""
    model, handle = _attached()
    batch = random_batch(1, PROMPT + STEPS)
    with handle:
        cache = DynamicCache()
        _decode(model, batch, False, cache)
    copy = DynamicCache()
    for index, layer in enumerate(cast(list[DynamicLayer], cache.layers)):
        assert layer.keys is not None and layer.values is not None
        copy.update(layer.keys.clone(), layer.values.clone(), index)
    token = torch.tensor([[5]])
    ours = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)).logits
    theirs = model(input_ids=token, use_cache=True, **cache_kwargs(model, copy)).logits
    assert torch.equal(ours, theirs)
    assert cache.get_seq_length() == PROMPT + STEPS + 1


@torch.no_grad()
def test_the_output_carries_the_users_cache() -> None:
    model, handle = _attached()
    batch = random_batch(1, PROMPT + 1)
    cache = DynamicCache()
    with handle:
        model(input_ids=batch["input_ids"][:, :PROMPT], **cache_kwargs(model, cache))
        output = model(input_ids=batch["input_ids"][:, PROMPT:], **cache_kwargs(model, cache))
        as_tuple = model(input_ids=torch.tensor([[7]]), return_dict=False, **cache_kwargs(model, cache))
    assert type(output.get("cache", output.get("past_key_values"))) is DynamicCache
    assert any(item is cache for item in as_tuple)


def test_a_prefix_that_records_a_gradient_keeps_the_old_path() -> None:
    """With gradients on and a trainable prefix, nothing with a graph goes into the cache."""
    model, handle = _attached()
    batch = random_batch(1, PROMPT + STEPS)
    with handle, _counting_steps() as counts:
        decoded = _decode(model, batch, False, DynamicCache())
        with torch.no_grad():
            expected = _uncached(model, batch, False)
    assert counts["served"] == 0
    torch.testing.assert_close(decoded.detach(), expected, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_bfloat16_decode_matches_the_path_off(layout: str) -> None:
    model, handle = _attached()
    model.to(torch.bfloat16)
    batch = random_batch(2, PROMPT + STEPS)
    with handle:
        with _counting_steps() as counts:
            stepped = _decode(model, batch, False, DynamicCache())
        with _storage_off():
            plain = _decode(model, batch, False, DynamicCache())
    assert counts["served"] > 0
    torch.testing.assert_close(stepped.float(), plain.float(), atol=2e-2, rtol=2e-2)


@torch.no_grad()
def test_beam_search_and_sampling_generate_as_with_the_path_off(layout: str) -> None:
    model, handle = _attached()
    batch = random_batch(2, PROMPT, left_pad=[2])
    runs = []
    for storage in (True, False):
        with handle, (_counting_steps() if storage else _storage_off()) as counts:
            beams = model.generate(**batch, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
            torch.manual_seed(3)
            sampled = model.generate(**batch, max_new_tokens=6, do_sample=True, pad_token_id=0)
        runs.append((beams, sampled))
        assert (counts["served"] > 0) == storage
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


@torch.no_grad()
def test_threads_decoding_their_own_caches(layout: str) -> None:
    model, handle = _attached()
    batches = [random_batch(1, PROMPT + STEPS, seed=seed) for seed in range(4)]
    with handle:
        alone = [_decode(model, batch, False, DynamicCache()) for batch in batches]
        together: list[torch.Tensor | None] = [None] * len(batches)

        def run(index: int) -> None:
            with torch.no_grad():
                together[index] = _decode(model, batches[index], False, DynamicCache())

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for one, other in zip(alone, together, strict=True):
        assert other is not None
        torch.testing.assert_close(one, other, atol=ATOL, rtol=ATOL)


def _aten_ops(model: PreTrainedModel, cache: DynamicCache, token: torch.Tensor, **kwargs: Any) -> collections.Counter[str]:
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(input_ids=token, use_cache=True, **cache_kwargs(model, cache), **kwargs)
    return collections.Counter(e.name for e in profiler.events() if e.name.startswith("aten::"))


def _step_ops(explicit: bool) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Operators of one steady decode step (the third after the prefill), base and ours, and the layers."""
    model, handle = _attached(num_hidden_layers=4)
    batch = random_batch(1, PROMPT + 3)
    counts = []
    for attached in (False, True):
        cache = DynamicCache()
        if attached:
            handle.attach()
        try:
            _decode(model, {key: value[:, : PROMPT + 2] for key, value in batch.items()}, explicit, cache)
            token = batch["input_ids"][:, -1:]
            kwargs = {"attention_mask": batch["attention_mask"], "position_ids": torch.tensor([[PROMPT + 2]])} if explicit else {}
            counts.append(_aten_ops(model, cache, token, **kwargs))
        finally:
            if attached:
                handle.detach()
    return counts[0], counts[1], model.config.num_hidden_layers


@pytest.mark.parametrize("explicit", [False, True], ids=["bare", "mask+positions"])
@torch.no_grad()
def test_a_decode_step_adds_a_few_operators_per_layer(explicit: bool, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural, not timed: a steady decode step dispatches a few aten operators per layer more than the
    base model's, plus a constant per step (the merged attention added about 20 per layer). A short cache
    concatenates as the base does (+1 view per tensor); a long one replaces the concatenation, a copy of
    the whole layer, by a write of the new entry and views (+3 per tensor), and concatenates nothing."""
    monkeypatch.setattr(prefixed_cache, "MIN_SPARE", 32)  # a step with room to spare, not the one that fills it
    base, ours, layers = _step_ops(explicit)
    added = sum(ours.values()) - sum(base.values())
    if layout == "concatenated":
        assert added <= 4 * layers + 4, f"base {sum(base.values())}, ours {sum(ours.values())}"
    else:
        assert added <= 6 * layers + 4, f"base {sum(base.values())}, ours {sum(ours.values())}"
        assert ours["aten::cat"] == base["aten::cat"] - 2 * layers, (base["aten::cat"], ours["aten::cat"])


@torch.no_grad()
def test_a_long_cache_is_appended_in_place_and_earlier_views_keep_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``INPLACE_FROM`` positions a step writes its entries into spare room behind the tokens: the
    layer's storage stays where it is (no copy of the cache), tensors the user took from the layer
    earlier keep their values, and the decode equals the uncached forward."""
    monkeypatch.setattr(prefixed_cache, "INPLACE_FROM", 0)
    model, handle = _attached()
    batch = random_batch(2, PROMPT + STEPS)
    with handle:
        cache = DynamicCache()
        _decode(model, {key: value[:, : PROMPT + 2] for key, value in batch.items()}, False, cache)  # the storage is built with room
        layer = cast(DynamicLayer, cache.layers[0])
        assert layer.keys is not None and layer.values is not None
        pointer, held = layer.keys.untyped_storage().data_ptr(), (layer.keys, layer.values)
        snapshot = (held[0].clone(), held[1].clone())
        decoded = _decode(model, batch, False, cache, start=PROMPT + 2)
        expected = _uncached(model, batch, False)[:, PROMPT + 2 :]
    assert layer.keys is not None and layer.keys.untyped_storage().data_ptr() == pointer
    assert layer.keys.shape[-2] == PROMPT + STEPS
    assert torch.equal(held[0], snapshot[0]) and torch.equal(held[1], snapshot[1])
    torch.testing.assert_close(decoded, expected, atol=ATOL, rtol=ATOL)


def test_a_cache_filled_in_inference_mode_continues_outside_it(layout: str) -> None:
    """Tensors made under ``torch.inference_mode`` cannot be written outside it; the step copies instead."""
    model, handle = _attached()
    batch = random_batch(1, PROMPT + STEPS)
    with handle:
        cache = DynamicCache()
        with torch.inference_mode():
            _decode(model, {key: value[:, : PROMPT + 2] for key, value in batch.items()}, False, cache)
        with torch.no_grad(), _counting_steps() as counts:
            decoded = _decode(model, batch, False, cache, start=PROMPT + 2)
            expected = _uncached(model, batch, False)[:, PROMPT + 2 :]
    assert counts["served"] > 0
    torch.testing.assert_close(decoded, expected, atol=ATOL, rtol=ATOL)


def test_keys_that_record_a_gradient_backpropagate_as_with_the_path_off(layout: str) -> None:
    """A frozen prefix, inputs that record a gradient: the steps may not write into storage an earlier
    step's graph saved; the gradient through three cached steps equals the one with the path off."""
    model, handle = _attached()
    handle.encoder.requires_grad_(False)
    batch = random_batch(1, PROMPT + 3)
    grads = []
    for storage in (True, False):
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()  # (1, T, hidden)
        with handle, (_counting_steps() if storage else _storage_off()) as counts:
            cache = DynamicCache()
            outputs = [model(inputs_embeds=embeds[:, :PROMPT], use_cache=True, **cache_kwargs(model, cache)).logits]
            for position in range(PROMPT, PROMPT + 3):
                step = model(inputs_embeds=embeds[:, position : position + 1], use_cache=True, **cache_kwargs(model, cache))
                outputs.append(step.logits)
            torch.cat(outputs, dim=1).square().sum().backward()
        assert (counts["served"] > 0) == storage
        assert embeds.grad is not None
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=ATOL)
