"""Mixed precision with every adapter method on a tiny Llama: bf16 autocast on CPU, and bf16 /
fp16 models carrying float32 adapters.

Oracles: PEFT on identical weights (our adapter saved, loaded with ``PeftModel.from_pretrained``;
PEFT keeps adapters float32 via ``autocast_adapter_dtype=True``) under the same precision, and
the float32 model. LoRA, prompt tuning and IA3 compute exactly PEFT's operations: equal to
1e-5. Prefix tuning feeds PEFT's prefix through the cache (cast to the model dtype there) where
we splice it at the attention call, so the two round differently: equal to bf16/fp16 round-off,
as each is to float32 (measured ~3e-3 in bf16, ~4e-4 in fp16; the prefix moves logits by ~0.4).
PEFT runs through ``bridge_peft_cache_keyword`` (it passes the cache as ``past_key_values``,
which transformers 5.24+ accepts only with a FutureWarning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from shared_fixtures import bridge_peft_cache_keyword
from test_integration_compile import METHODS, make_adapter
from tiny_models import build_model, random_batch
from torch import nn

EXACT = 1e-5
ROUND_OFF = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # logits of magnitude ~1, a few ulps
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def batch() -> dict[str, torch.Tensor]:
    inputs = random_batch(2, 6, seed=1, left_pad=[0, 2])
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


def real(logits: torch.Tensor) -> torch.Tensor:
    """Logits at real tokens, float32: (N_real, V)."""
    return logits[:, -6:][batch()["attention_mask"].bool()].float()


def bf16_autocast() -> AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each method's seeded adapter, saved once in PEFT's folder layout."""
    folders = {}
    for method in METHODS:
        folder = tmp_path_factory.mktemp(method)
        make_adapter(method, build_model("llama")).save(folder)
        folders[method] = folder
    return folders


def peft_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = peft.PeftModel.from_pretrained(cast(nn.Module, build_model("llama")).to(dtype), folder)
    adapter = [p for name, p in model.named_parameters() if any(k in name for k in ("lora_", "ia3_", "prompt_encoder"))]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)  # autocast_adapter_dtype=True
    return bridge_peft_cache_keyword(model.eval())


def tolerance(method: str, dtype: torch.dtype) -> float:
    return ROUND_OFF[dtype] if method == "prefix" else EXACT


def fp32_logits(method: str) -> torch.Tensor:
    model = build_model("llama")
    with make_adapter(method, model), torch.no_grad():
        return real(model(**batch()).logits)


def fp32_grads(method: str) -> Iterator[torch.Tensor]:
    model = build_model("llama").train()
    handle = make_adapter(method, model)
    with handle:
        model(**batch()).loss.backward()
    return (p.grad for _, p in handle.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_matches_peft_and_trains_fp32_adapter(method: str, saved: dict[str, Path]) -> None:
    model = build_model("llama")
    handle = make_adapter(method, model)
    theirs = peft_model(saved[method])
    with torch.no_grad(), bf16_autocast():
        expected = theirs(**batch())
    with handle:
        with torch.no_grad(), bf16_autocast():
            ours = model(**batch())
        assert ours.logits.dtype == torch.bfloat16
        torch.testing.assert_close(real(ours.logits), real(expected.logits), atol=tolerance(method, torch.bfloat16), rtol=0)
        torch.testing.assert_close(real(ours.logits), fp32_logits(method), atol=ROUND_OFF[torch.bfloat16], rtol=0)

        model.train()
        with bf16_autocast():
            loss = model(**batch()).loss
        loss.backward()
    grads = [p.grad for _, p in handle.named_parameters() if p.grad is not None]
    assert grads and all(p.dtype == torch.float32 for p in handle.parameters())
    for grad, reference in zip(grads, fp32_grads(method), strict=True):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        scale = reference.abs().max()
        assert scale > 0 and (grad - reference).abs().max() <= 5e-2 * scale  # bf16 activations


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
def test_half_model_with_fp32_adapter_matches_peft_trains_and_restores(
    method: str, dtype_name: str, saved: dict[str, Path]
) -> None:
    dtype = DTYPES[dtype_name]
    model = build_model("llama")
    cast(nn.Module, model).to(dtype)  # in place
    warm_up(model)
    before = snapshot(model)
    handle = make_adapter(method, model)
    with torch.no_grad():
        expected = peft_model(saved[method], dtype)(**batch()).logits
    with handle:
        assert all(p.dtype == torch.float32 for p in handle.parameters())
        with torch.no_grad():
            ours = model(**batch()).logits
        assert ours.dtype == dtype
        torch.testing.assert_close(real(ours), real(expected), atol=tolerance(method, dtype), rtol=0)
        torch.testing.assert_close(real(ours), fp32_logits(method), atol=ROUND_OFF[dtype], rtol=0)

        model.train()
        start = {name: p.detach().clone() for name, p in handle.named_parameters()}
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
        loss = model(**batch()).loss
        loss.backward()
        assert any(p.grad is not None for p in handle.parameters())
        for name, parameter in handle.named_parameters():
            if parameter.grad is not None:
                assert parameter.grad.dtype == torch.float32 and torch.isfinite(parameter.grad).all()
        optimizer.step()
        assert any(not torch.equal(p, start[name]) for name, p in handle.named_parameters())
        assert all(p.dtype == torch.float32 for p in handle.parameters())
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    assert_untouched(model, before)


def test_adapter_off_under_autocast_is_the_base_model() -> None:
    """``disabled()`` under autocast gives the base model's autocast output bit for bit."""
    model = build_model("llama")
    with torch.no_grad(), bf16_autocast():
        base = model(**batch()).logits
    with make_adapter("lora", model) as handle, handle.disabled(), torch.no_grad(), bf16_autocast():
        assert torch.equal(model(**batch()).logits, base)
