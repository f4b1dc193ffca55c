"""The CUDA prefill path (``prefix.fused_prefill``): sdpa with a lower-right causal bias over
``[prefix; real]`` equals the concatenating splice's explicit mask.

Checked on CPU by letting the function serve the CPU (there the bias is materialised, the
arithmetic is the same); ``tests/integration/test_gpu.py`` checks whole models on CUDA.
Oracle: plain sdpa over the concatenated keys with heads repeated and the explicit
``causal_mask_with_prefix``.
"""

from __future__ import annotations

import pytest
import torch

from prefix_hooks.prefix.fused_prefill import lower_right_prefill
from prefix_hooks.prefix.splice import causal_mask_with_prefix

B, H, KV, T, P, D = 2, 4, 2, 6, 3, 8


def _inputs(dtype: torch.dtype, cached: int = T, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, KV, cached, D), (B, KV, cached, D), (B, KV, P, D), (B, KV, P, D)]
    return [torch.randn(*shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
               prefix_value: torch.Tensor, scale: float | None) -> torch.Tensor:
    key = torch.cat([prefix_key, key[:, :, :T]], dim=2).repeat_interleave(H // KV, dim=1)  # (B, H, P + T, D)
    value = torch.cat([prefix_value, value[:, :, :T]], dim=2).repeat_interleave(H // KV, dim=1)
    mask = causal_mask_with_prefix(T, P, query.device)  # (1, 1, T, P + T)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (B, T, H, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cached", [T, T + 4], ids=["dynamic", "static tail"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_lower_right_bias_equals_the_explicit_mask_forward_and_backward(
    dtype: torch.dtype, cached: int, scale: float | None
) -> None:
    query, key, value, prefix_key, prefix_value = _inputs(dtype, cached)
    result = lower_right_prefill(query, key, value, (prefix_key, prefix_value), {"scaling": scale}, devices=("cpu",))
    assert result is not None and result[1] is None
    got = result[0]
    want = _reference(query, key, value, prefix_key, prefix_value, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad(got, [query, key, value, prefix_key, prefix_value], upstream)
    expected = torch.autograd.grad(want, [query, key, value, prefix_key, prefix_value], upstream)
    for ours, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


def test_other_devices_and_arguments_are_left_to_the_splice() -> None:
    query, key, value, prefix_key, prefix_value = _inputs(torch.float32)
    prefix = (prefix_key, prefix_value)
    assert lower_right_prefill(query, key, value, prefix, {}) is None  # CUDA only by default
    assert lower_right_prefill(query, key, value, prefix, {"softcap": 30.0}, devices=("cpu",)) is None
    assert lower_right_prefill(query, key[:, :1].expand(-1, 3, -1, -1), value, prefix, {}, devices=("cpu",)) is None
