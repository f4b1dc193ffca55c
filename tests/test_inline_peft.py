"""Parity with PEFT on the inline-attention families it handles correctly.

PEFT puts the prefix into the cache (and ``P`` ones into the mask); we splice it through a
cache view. First PEFT itself is checked against the prompt oracle (a prefix made of a
prompt's cached keys/values must reproduce ``model(prompt + text)``); then our logits must
match PEFT's on identical weights within 1e-5.

Multi-query falcon is left out: PEFT sizes the prefix by ``num_attention_heads`` (4 heads)
while the layer caches one key/value head, so PEFT cannot even load a prefix of the right size.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from test_inline_oracle import prompt_as_prefix
from tiny_inline import build_variant, variant_backend_pairs
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
PEFT_VARIANTS = ("gptj", "codegen", "gpt_neo", "gpt_neo_window", "bloom", "mpt", "falcon_mha", "falcon_gqa", "falcon_alibi")
# PEFT cannot read MPT's head count from its config (``n_heads``): give it the dimensions.
PEFT_DIMS: dict[str, dict[str, Any]] = {"mpt": {"num_attention_heads": 4, "token_dim": 32, "num_layers": 2}}


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    return random_batch(BATCH, SEQ_LEN, seed=1, left_pad=LEFT_PAD if padded else None)


def _peft_model(variant: str, attn_implementation: str, prefix_projection: bool) -> peft.PeftModel:
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=prefix_projection, **PEFT_DIMS.get(variant, {})
    )
    return peft.get_peft_model(build_variant(variant, attn_implementation), config).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
