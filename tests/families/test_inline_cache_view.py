"""The cache view on its own: what ``update()`` returns, what the real cache keeps, what it claims to be."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from prefix_hooks.prefix.cache_view import PrefixCacheView, prepend_prefix

B, KV_HEADS, P, T, D = 2, 3, 4, 5, 8


def _states(seed: int) -> torch.Tensor:
    return torch.randn(B, KV_HEADS, T, D, generator=torch.Generator().manual_seed(seed))  # (B, kv_heads, T, D)


def test_update_returns_prefix_then_cache_and_stores_real_tokens_only() -> None:
    prefix_key, prefix_value = torch.randn(2, KV_HEADS, P, D).unbind(0)  # (kv_heads, P, D) each
    cache = DynamicCache()
    view = PrefixCacheView(cache, prefix_key, prefix_value)
    assert isinstance(view, DynamicCache)

    view.update(_states(0), _states(1), 0)
    keys, values = view.update(_states(2), _states(3), 0)  # a second step sees both real steps

    real_keys = torch.cat([_states(0), _states(2)], dim=2)  # (B, kv_heads, 2T, D)
    real_values = torch.cat([_states(1), _states(3)], dim=2)
    assert torch.equal(keys[:, :, :P], prefix_key[None].expand(B, -1, -1, -1))
    assert torch.equal(values[:, :, :P], prefix_value[None].expand(B, -1, -1, -1))
    assert torch.equal(keys[:, :, P:], real_keys) and torch.equal(values[:, :, P:], real_values)
    assert cache.get_seq_length() == view.get_seq_length() == 2 * T
    stored = cast(DynamicLayer, cache.layers[0]).keys
    assert stored is not None and torch.equal(stored, real_keys)


def test_without_a_cache_the_view_splices_and_keeps_nothing() -> None:
    prefix_key, prefix_value = torch.randn(2, KV_HEADS, P, D).unbind(0)
    view = PrefixCacheView(None, prefix_key, prefix_value)
    keys, _ = view.update(_states(0), _states(1), 0)
    assert keys.shape == (B, KV_HEADS, P + T, D)
    assert view.get_seq_length() == 0
    assert view.update(_states(2), _states(3), 0)[0].shape == (B, KV_HEADS, P + T, D)


def test_prepend_prefix_casts_and_rejects_a_mismatched_prefix() -> None:
    states = _states(0).to(torch.float64)
    assert prepend_prefix(torch.zeros(KV_HEADS, P, D), states).dtype == torch.float64
    with pytest.raises(ValueError, match=r"prefix of shape \(4, 4, 8\) \(kv_heads, P, D\) does not fit"):
        prepend_prefix(torch.zeros(KV_HEADS + 1, P, D), states)
