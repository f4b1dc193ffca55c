"""Which route brings the prefix to each attention module of the inline families, and that it comes once.

An attention module that calls the attention-function registry and receives the per-forward
state through ``**kwargs`` (GPT-J and CodeGen since transformers 5.24) is served by the
interposer and gets no hook; every other module (GPT-Neo, BLOOM, MPT; Falcon on every release,
whose layers drop ``**kwargs`` and whose alibi lives in the mask) gets a cache view. Either
way each layer takes the prefix exactly once per forward, also if a layer were to pass the
interposer's state down to a module that a cache view already serves.

Oracle for decoding: one forward over the whole (left-padded) sequence against a prefill and
one-token steps through ``model(...)`` with a user ``DynamicCache`` passed under the keyword
the installed transformers takes, and no ``position_ids`` (the loop streaming servers write).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import torch
from tiny_inline import VARIANTS, build_variant, feed_chunks, variant_backend_pairs
from tiny_models import random_batch
from torch import nn
from transformers import DynamicCache

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import attends_through_registry
from prefix_hooks.families import adapter_for
from prefix_hooks.families._inline import InlineAttentionAdapter
from prefix_hooks.prefix.attachment import PrefixForwardState
from prefix_hooks.prefix.interposer import STATE_KWARG

P = 3
ATOL = 1e-5
PAIRS = variant_backend_pairs()


def _attached(model: nn.Module) -> PrefixAttachment:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    nn.init.normal_(handle.encoder.embedding.weight, generator=torch.Generator().manual_seed(1))
    return handle


@contextmanager
def counting_splices(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[nn.Module]]:
    """Every module a prefix is handed to (``prefix_for`` calls that return one), in call order."""
    handed: list[nn.Module] = []
    original = PrefixForwardState.prefix_for

    def prefix_for(self: PrefixForwardState, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        prefix = original(self, module, *args, **kwargs)
        if prefix is not None:
            handed.append(module)
        return prefix

    with monkeypatch.context() as patch:
        patch.setattr(PrefixForwardState, "prefix_for", prefix_for)
        yield handed


@pytest.mark.parametrize("variant", sorted({variant for variant, _ in PAIRS}))
def test_each_attention_module_has_one_route(variant: str) -> None:
    """Cache-view hooks exactly on the modules the interposer does not serve; registry-served ones
    only where the module calls the registry (never Falcon)."""
    model = build_variant(variant, "eager")
    adapter = cast(InlineAttentionAdapter, adapter_for(model))
    sites = adapter.attention_sites(model)
    before = {site.module: len(site.module._forward_pre_hooks) for site in sites}
    with _attached(model):
        for site in sites:
            served = adapter.serves_through_registry(site.module)
            assert served == (attends_through_registry(site.module) and adapter.name != "falcon")
            assert len(site.module._forward_pre_hooks) - before[site.module] == (0 if served else 1)


@pytest.mark.parametrize(("variant", "impl"), PAIRS)
def test_every_layer_takes_the_prefix_once_per_forward(
    variant: str, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_variant(variant, impl)
    batch = random_batch(2, 5, seed=2, left_pad=[0, 1])
    sites = adapter_for(model).attention_sites(model)
    with _attached(model), torch.no_grad(), counting_splices(monkeypatch) as handed:
        model(**batch)
    assert sorted(map(id, handed)) == sorted(id(site.module) for site in sites)


@pytest.mark.parametrize(("variant", "impl"), [pair for pair in PAIRS if pair[0].startswith("falcon")])
def test_a_cache_view_keeps_the_interposer_out(variant: str, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were a Falcon layer to pass the root's ``**kwargs`` (the interposer's state) down to its attention,
    which calls the registry since 5.25, the cache view would still be the only splice."""
    model = build_variant(variant, impl)
    batch = random_batch(2, 5, seed=2, left_pad=[0, 1])
    handle = _attached(model)
    sites = adapter_for(model).attention_sites(model)
    with handle, torch.no_grad():
        expected = model(**batch).logits
    states: list[Any] = []

    def pass_state_down(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        states.append(handle._current_state())  # the state the root's forward built for this forward
        return args, {**kwargs, STATE_KWARG: states[-1]}

    # runs before the view's hook (registered first), as a layer passing **kwargs would
    down = [site.module.register_forward_pre_hook(pass_state_down, with_kwargs=True) for site in sites]
    try:
        with handle, torch.no_grad(), counting_splices(monkeypatch) as handed:
            passed_down = model(**batch).logits
    finally:
        for hook in down:
            hook.remove()
    assert states and states[-1] is not None, "the root must have built the interposer's state"
    assert len(handed) == len(sites)
    torch.testing.assert_close(passed_down, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("variant", "impl"), PAIRS)
def test_decoding_through_forward_without_positions_equals_one_forward(variant: str, impl: str) -> None:
    model = build_variant(variant, impl)
    if variant == "mpt":  # MPT's alibi has no batch axis: pad on the right (test_inline_cache explains)
        batch = random_batch(2, 7, seed=3)
        batch["attention_mask"][1, -2:] = 0
    else:
        batch = random_batch(2, 7, seed=3, left_pad=[0, 2])
    real = batch["attention_mask"].bool()
    with _attached(model) as handle, torch.no_grad():
        full = model(**batch).logits  # (B, T, V)
        with handle.disabled():
            base = model(**batch).logits
        cache = DynamicCache(config=model.config)
        steps = feed_chunks(model, batch["input_ids"], [4, 1, 1, 1], cache, batch["attention_mask"])
    assert (full[real] - base[real]).abs().max() > 1e-3, "the prefix must matter, or the test proves nothing"
    assert cache.get_seq_length() == 7, "the cache holds the real tokens only"
    torch.testing.assert_close(steps[real], full[real], rtol=0, atol=ATOL)


def test_variants_cover_every_falcon_layout() -> None:
    """Multi-query, full and grouped kv heads; rotary and alibi; parallel and sequential attention."""
    layouts = set()
    for variant, (model_type, _) in VARIANTS.items():
        if model_type == "falcon":
            config = build_variant(variant, "eager").config
            heads = "grouped" if config.new_decoder_architecture else "mqa" if config.multi_query else "full"
            layouts.add((heads, bool(config.alibi), bool(config.parallel_attn)))
    assert {heads for heads, _, _ in layouts} == {"mqa", "full", "grouped"}
    assert {alibi for _, alibi, _ in layouts} == {False, True}
    assert {parallel for _, _, parallel in layouts} == {False, True}
