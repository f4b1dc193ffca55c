"""GPU-only checks: flash attention's 2-D mask convention, bf16, sdpa on CUDA, the fused causal
prefill (``prefix.fused_prefill``) forward and backward, decode steps on a DynamicCache.

Skipped cleanly without CUDA (CI has none). Oracle: the same weights and prefix through
sdpa in float32 on the same device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from shared_fixtures import cache_kwargs
from tiny_models import build_model, random_batch
from transformers import DynamicCache
from transformers.utils import is_flash_attn_2_available

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.prefix import fused_prefill, interposer

P = 6
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _attached_pair(family: str, implementation: str, dtype: torch.dtype, reference_dtype: torch.dtype) -> Any:
    """Two models with the same weights and the same prefix on CUDA: (candidate, reference, handles)."""
    candidate: Any = build_model(family, "sdpa")
    candidate.set_attn_implementation(implementation)  # same weights, other backend
    reference: Any = build_model(family, "sdpa")
    candidate, reference = candidate.to("cuda", dtype), reference.to("cuda", reference_dtype)
    first = attach_prefix(candidate, PrefixTuningConfig(num_virtual_tokens=P))
    second = attach_prefix(reference, PrefixTuningConfig(num_virtual_tokens=P))
    torch.nn.init.normal_(first.encoder.embedding.weight, std=0.5)
    second.encoder.load_state_dict(first.encoder.state_dict())
    return candidate, reference, (first, second)


def _cuda_batch() -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in random_batch(2, 12, left_pad=[4]).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_on_cuda_matches_float32_reference(family: str, dtype: torch.dtype) -> None:
    candidate, reference, (first, second) = _attached_pair(family, "sdpa", dtype, torch.float32)
    batch = _cuda_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad(), first, second:
        got = candidate(**batch).logits.float()
        want = reference(**batch).logits
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got[real], want[real], atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash_attn is not installed")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_flash_attention_2_matches_sdpa(family: str) -> None:
    candidate, reference, (first, second) = _attached_pair(family, "flash_attention_2", torch.bfloat16, torch.bfloat16)
    batch = _cuda_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad(), first, second:
        got = candidate(**batch).logits.float()
        want = reference(**batch).logits.float()
        got_tokens = candidate.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want_tokens = reference.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got[real], want[real], atol=5e-2, rtol=5e-2)
    assert torch.equal(got_tokens, want_tokens)


def _fused_and_eager(family: str, dtype: torch.dtype) -> Any:
    """A CUDA sdpa model in ``dtype`` and a float32 eager reference with the same weights and prefix."""
    candidate: Any = build_model(family, "sdpa")
    reference: Any = build_model(family, "eager")
    candidate, reference = candidate.to("cuda", dtype), reference.to("cuda", torch.float32)
    first = attach_prefix(candidate, PrefixTuningConfig(num_virtual_tokens=P))
    second = attach_prefix(reference, PrefixTuningConfig(num_virtual_tokens=P))
    torch.nn.init.normal_(first.encoder.embedding.weight, std=0.5)
    second.encoder.load_state_dict(first.encoder.state_dict())
    return candidate, reference, first, second


@contextmanager
def _counting_fused() -> Iterator[dict[str, int]]:
    counts = {"fused": 0}
    original = fused_prefill.lower_right_prefill

    def counting(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        counts["fused"] += result is not None
        return result

    interposer.lower_right_prefill = counting
    try:
        yield counts
    finally:
        interposer.lower_right_prefill = original


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_prefill_takes_the_fused_path_forward_and_backward(family: str, dtype: torch.dtype) -> None:
    """An unpadded prefill on CUDA goes through sdpa with a lower-right causal bias (flash-capable), in
    every layer; logits and the prefix's gradient equal float32 eager attention over the concatenation."""
    candidate, reference, first, second = _fused_and_eager(family, dtype)
    input_ids = random_batch(2, 12)["input_ids"].cuda()  # no padding: transformers passes mask=None
    with first, second, _counting_fused() as counts:
        got = candidate(input_ids=input_ids, labels=input_ids)
        want = reference(input_ids=input_ids, labels=input_ids)
        got.loss.backward()
        want.loss.backward()
    assert counts["fused"] == candidate.config.num_hidden_layers
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.logits.float(), want.logits, atol=tolerance, rtol=tolerance)
    grad, expected = first.encoder.embedding.weight.grad, second.encoder.embedding.weight.grad
    assert grad is not None and expected is not None
    torch.testing.assert_close(grad.float(), expected, atol=tolerance * 10, rtol=tolerance * 10)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_steps_on_cuda_match_an_uncached_forward(family: str) -> None:
    """Single-token steps on a DynamicCache (the prefix kept in the cache's storage) on CUDA."""
    candidate, _, first, _ = _fused_and_eager(family, torch.float32)
    input_ids = random_batch(1, 12)["input_ids"].cuda()
    with torch.no_grad(), first:
        cache = DynamicCache()
        logits = [candidate(input_ids=input_ids[:, :8], use_cache=True, **cache_kwargs(candidate, cache)).logits]
        for position in range(8, 12):
            step = candidate(input_ids=input_ids[:, position : position + 1], use_cache=True, **cache_kwargs(candidate, cache))
            logits.append(step.logits)
        whole = candidate(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), whole, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 12
