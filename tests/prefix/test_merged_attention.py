"""The cache-copy-free sdpa path equals attention over concatenated keys/values.

Oracle: torch's sdpa over ``cat(prefix, K)``, ``cat(prefix, V)`` (heads repeated) with
the mask extended by visible columns, i.e. the splice every other case uses; and whole
models run with the path switched off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import build_model, random_batch
from torch import nn

import prefix_hooks.prefix.merged_attention as merged_module
from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.prefix.merged_attention import merged_attention
from prefix_hooks.prefix.prefixed_cache import PrefixedStorage
from prefix_hooks.prefix.splice import causal_mask_with_prefix, extend_mask

HEAD_DIM = 8
CAUSAL = nn.Module()
CAUSAL.is_causal = True  # type: ignore[assignment]


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               prefix: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """Plain sdpa over the concatenated keys, with sdpa's mask=None meaning top-left causal."""
    batch, heads, q_len, _ = query.shape
    groups = heads // key.shape[1]
    num_prefix = prefix[0].shape[1]
    if mask is None and q_len > 1:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        full_mask: torch.Tensor | None = causal_mask_with_prefix(q_len, num_prefix, query.device)
    else:
        full_mask = None if mask is None else extend_mask(mask, num_prefix)
    full_key = torch.cat([prefix[0][None].expand(batch, -1, -1, -1), key], dim=2).repeat_interleave(groups, dim=1)
    full_value = torch.cat([prefix[1][None].expand(batch, -1, -1, -1), value], dim=2).repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, full_key, full_value, attn_mask=full_mask, scale=scale)
    return out.transpose(1, 2)  # (B, T, H, D)


@given(
    batch=st.integers(1, 3),
    kv_heads=st.sampled_from([1, 2, 4]),
    groups=st.sampled_from([1, 2, 3]),
    q_len=st.sampled_from([1, 1, 2, 5]),
    extra_context=st.integers(0, 40),
    num_prefix=st.integers(1, 9),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_merged_attention_equals_concatenation(batch: int, kv_heads: int, groups: int, q_len: int,
                                               extra_context: int, num_prefix: int, mask_kind: str,
                                               dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(extra_context * 31 + num_prefix * 7 + q_len)
    context = q_len + extra_context
    query = torch.randn(batch, kv_heads * groups, q_len, HEAD_DIM, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, context, HEAD_DIM, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, context, HEAD_DIM, generator=generator).to(dtype)
    prefix = (torch.randn(kv_heads, num_prefix, HEAD_DIM, generator=generator).to(dtype),
              torch.randn(kv_heads, num_prefix, HEAD_DIM, generator=generator).to(dtype))
    mask: torch.Tensor | None = None
    if mask_kind != "none":
        visible = torch.rand(batch, 1, q_len, context, generator=generator) > 0.3
        if mask_kind == "bool":
            mask = visible
        else:
            mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min).to(dtype)
    scale = HEAD_DIM**-0.5
    with torch.no_grad():
        merged = merged_attention(CAUSAL, query, key, value, mask, prefix, {"scaling": scale}, {})
    assert merged is not None
    reference_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.float())
    want = _reference(query.float(), key.float(), value.float(), reference_mask,
                      (prefix[0].float(), prefix[1].float()), scale)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged[0].float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("q_len", [1, 3])
def test_row_without_visible_real_keys_attends_to_the_prefix_only(q_len: int) -> None:
    query, key, value = torch.randn(1, 2, q_len, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    prefix = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    hidden = torch.zeros(1, 1, q_len, 5, dtype=torch.bool)
    with torch.no_grad():
        merged = merged_attention(CAUSAL, query, key, value, hidden, prefix, {"scaling": 0.5}, {})
    assert merged is not None
    want = torch.nn.functional.scaled_dot_product_attention(query, prefix[0][None], prefix[1][None], scale=0.5)
    torch.testing.assert_close(merged[0], want.transpose(1, 2))


@pytest.mark.parametrize(
    ("condition", "kwargs"),
    [("grad", {}), ("per-head mask", {}), ("dropout", {"dropout": 0.1}), ("softcap", {"softcap": 30.0})],
)
def test_other_cases_fall_back_to_concatenation(condition: str, kwargs: dict[str, Any]) -> None:
    query, key, value = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    prefix = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    mask = torch.ones(1, 2, 1, 5, dtype=torch.bool) if condition == "per-head mask" else None
    with torch.set_grad_enabled(condition == "grad"):
        assert merged_attention(CAUSAL, query, key, value, mask, prefix, kwargs, {}) is None


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gemma3_text"])
def test_models_use_the_merged_path_and_match_concatenation(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prefill (padded and unpadded) takes the merged path, and so does every decode step the
    prefixed cache does not serve (gemma3's sliding-window layers); the tokens and logits equal
    those of the concatenating splice with both paths off."""
    model: Any = build_model(family, "sdpa")
    batches = [random_batch(2, 9, left_pad=[3]), random_batch(2, 9)]
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=4))
    torch.nn.init.normal_(handle.encoder.embedding.weight)
    calls = {"merged": 0, "prefixed": 0}
    update = PrefixedStorage.update

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = merged_module.merged_attention(*args, **kwargs)
        calls["merged"] += result is not None
        return result

    def counting_update(*args: Any, **kwargs: Any) -> Any:
        result = update(*args, **kwargs)
        calls["prefixed"] += result is not None
        return result

    def generate(batch: dict[str, torch.Tensor]) -> Any:
        return model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)

    layers = model.config.num_hidden_layers
    for batch in batches:
        calls.update(merged=0, prefixed=0)
        with handle:
            monkeypatch.setattr("prefix_hooks.prefix.interposer.merged_attention", counting)
            monkeypatch.setattr(PrefixedStorage, "update", counting_update)
            merged = generate(batch)
            monkeypatch.setattr("prefix_hooks.prefix.interposer.merged_attention", lambda *a, **k: None)
            monkeypatch.setattr(PrefixedStorage, "update", lambda *a, **k: None)
            concatenated = generate(batch)
        assert calls["merged"] >= layers  # the prefill, every layer
        assert calls["merged"] + calls["prefixed"] == 6 * layers  # prefill + 5 decode steps, every layer
        # sliding-window layers (all of the tiny gemma3's) keep the merged path
        assert (calls["prefixed"] > 0) == ("full_attention" in (getattr(model.config, "layer_types", None) or ["full_attention"]))
        assert torch.equal(merged.sequences, concatenated.sequences)
        for step_merged, step_concatenated in zip(merged.logits, concatenated.logits):
            torch.testing.assert_close(step_merged, step_concatenated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix_projection", [False, True])
def test_reused_layer_views_see_in_place_updates(dtype: torch.dtype, prefix_projection: bool) -> None:
    """Decode steps reuse each layer's expanded (and, in bf16, cast) prefix across forwards;
    an in-place update of the encoder (as an optimizer step makes) must be seen at once.
    Oracle: a second model whose encoder is loaded with the updated weights from the start."""
    config = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=prefix_projection)
    models = [build_model("llama", "sdpa", seed=0) for _ in range(2)]
    for model in models:
        nn.Module.to(model, dtype)
    handles = [attach_prefix(model, config) for model in models]
    batch = random_batch(2, 6, seed=3)
    with handles[0], torch.no_grad():
        models[0](**batch)  # builds and memoizes the views
        first = models[0](**batch).logits
        for parameter in handles[0].encoder.parameters():
            parameter.add_(0.5)  # in place: same tensors, new version
        updated = models[0](**batch).logits
    handles[1].encoder.load_state_dict(handles[0].encoder.state_dict())
    with handles[1], torch.no_grad():
        fresh = models[1](**batch).logits
    assert not torch.equal(first, updated)
    assert torch.equal(updated, fresh)
