"""GPU-only checks: flash attention's 2-D mask convention, bf16, sdpa on CUDA.

Skipped cleanly without CUDA (CI has none). Oracle: the same weights and prefix through
sdpa in float32 on the same device.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import build_model, random_batch
from transformers.utils import is_flash_attn_2_available

from prefix_hooks import PrefixTuningConfig, attach_prefix

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
