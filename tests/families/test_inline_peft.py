"""Parity with PEFT on the inline-attention families.

PEFT puts the prefix into the cache (and ``P`` ones into the mask); we splice it through a
cache view or the attention interposer. First PEFT itself is checked against the prompt
oracle (a prefix made of a prompt's cached keys/values must reproduce ``model(prompt + text)``);
then our logits must match PEFT's on identical weights within 1e-5.

PEFT is given the prefix's dimensions as the layers cache them (``peft_dims``): it reads neither
MPT's head count nor Falcon's kv heads from the config (multi-query Falcon caches one kv head;
grouped Falcon caches ``num_kv_heads`` since transformers 5.25, every query head before), so
left to itself it builds a prefix the layers cannot take.

PEFT 0.21.2 passes its cache as ``past_key_values=``, which transformers 5.24+ deprecates in favour
of ``cache`` (a FutureWarning that names no module of ours): ``peft_calls`` silences exactly that
warning around PEFT's own calls. Its forward stays a valid oracle there (the prompt-oracle test
proves it on every release); its cached ``generate()`` does not (it passes both keywords), so no
test here uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import peft
import pytest
import torch
from test_inline_oracle import prompt_as_prefix
from tiny_inline import VARIANTS, build_variant, variant_backend_pairs
from tiny_models import random_batch
from transformers import PreTrainedModel

from prefix_hooks import PrefixTuningConfig, attach_prefix

P = 4
BATCH = 2
SEQ_LEN = 7
LEFT_PAD = [0, 3]
ATOL = 1e-5
PREFIX_SEED = 2
PROMPT_SEED = 3
PEFT_VARIANTS = tuple(VARIANTS)


@contextmanager
def peft_calls() -> Iterator[None]:
    """Around PEFT's own calls: ignore transformers' deprecation of the ``past_key_values=`` keyword
    PEFT 0.21.2 passes (5.24+), and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        yield


def peft_dims(model: PreTrainedModel) -> dict[str, Any]:
    """The prefix's dimensions as ``model``'s layers cache them, in PEFT's config fields."""
    resolved = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P)).config
    return {name: getattr(resolved, name) for name in ("num_attention_heads", "token_dim", "num_layers")}


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    return random_batch(BATCH, SEQ_LEN, seed=1, left_pad=LEFT_PAD if padded else None)


def _peft_model(variant: str, attn_implementation: str, prefix_projection: bool) -> peft.PeftModel:
    model = build_variant(variant, attn_implementation)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=prefix_projection, **peft_dims(model)
    )
    with peft_calls():
        return peft.get_peft_model(model, config).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with peft_calls() if isinstance(model, peft.PeftModel) else nullcontext():
        return model(**batch).logits  # (B, T, V)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("variant", PEFT_VARIANTS)
def test_peft_itself_matches_the_prompt_oracle(variant: str, padded: bool) -> None:
    """PEFT is a valid oracle here: with a prompt's cache as its prefix it reproduces ``prompt + text``."""
    base: PreTrainedModel = build_variant(variant, "eager")
    prompt = random_batch(1, P, seed=PROMPT_SEED)["input_ids"]  # (1, P)
    text = _batch(padded)
    joined = {
        "input_ids": torch.cat([prompt.expand(BATCH, -1), text["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones(BATCH, P, dtype=torch.long), text["attention_mask"]], dim=1),
    }
    expected = _logits(base, joined)[:, P:]  # (B, T, V)
    weight = prompt_as_prefix(base, prompt)  # (P, L*2*kv_heads*D)

    peft_model = _peft_model(variant, "eager", prefix_projection=False)
    peft_model.prompt_encoder["default"].load_state_dict({"embedding.weight": weight})
    theirs = _logits(peft_model, text)

    real = text["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize(("variant", "attn_implementation"), variant_backend_pairs(PEFT_VARIANTS))
def test_inline_logits_match_peft(variant: str, padded: bool, prefix_projection: bool, attn_implementation: str) -> None:
    """Oracle: PEFT's ``get_peft_model`` with our encoder's state dict in its ``prompt_encoder``."""
    batch = _batch(padded)
    model = build_variant(variant, attn_implementation)
    base_logits = _logits(model, batch)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=prefix_projection))
    generator = torch.Generator().manual_seed(PREFIX_SEED)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    with handle:
        ours = _logits(model, batch)

    peft_model = _peft_model(variant, attn_implementation, prefix_projection)
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    theirs = _logits(peft_model, batch)

    real = batch["attention_mask"].bool()
    assert (ours[real] - base_logits[real]).abs().max() > 1e-2, "the prefix must matter, or the test proves nothing"
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
