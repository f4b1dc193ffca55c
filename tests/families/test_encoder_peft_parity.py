"""Parity with PEFT for encoder sequence classification (PEFT is the oracle).

PEFT passes the prefix as a cache of length ``P`` (BERT then numbers real tokens
``P..``, RoBERTa ``pad + P + 1, ...``) and prepends ``P`` ones to the attention mask;
we splice the prefix into each self-attention and offset the positions by default.
Logits must agree within 1e-5 on identical weights, padded batches included, with and
without the projection MLP. Where transformers renamed the cache (5.24+) PEFT 0.21.2 refuses
these heads; there it runs with its one stale keyword translated (``bridge_peft_cache_keyword``).
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from shared_fixtures import bridge_peft_cache_keyword
from tiny_encoders import attach_random_prefix, build, text_batch

P = 4  # num_virtual_tokens
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
PADDINGS: dict[str, dict[str, Any]] = {
    "unpadded": {}, "right_padded": {"right_pad": [0, 3]}, "left_padded": {"left_pad": [0, 2]},
}


def _peft_model(family: str, attn_implementation: str, config: peft.PrefixTuningConfig) -> Any:
    return bridge_peft_cache_keyword(peft.get_peft_model(build(family, attn_implementation, MODEL_SEED), config).eval())


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for family in ("bert", "roberta"):
        for backend in ("eager", "sdpa"):
            for padding in PADDINGS:
                if padding == "left_padded" and family == "bert":
                    continue  # BERT's positions count pads: a left-padded row is a different input
                cases.append((family, backend, padding))
    return cases


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize(("family", "attn_implementation", "padding"), _cases())
def test_sequence_classification_matches_peft(
    family: str, attn_implementation: str, padding: str, prefix_projection: bool
) -> None:
    inputs = text_batch(family, 2, BATCH_SEED, **PADDINGS[padding])
    model = build(family, attn_implementation, MODEL_SEED)
    with torch.no_grad():
        base = model(**inputs).logits
        with attach_random_prefix(model, P, prefix_projection=prefix_projection) as handle:
            ours = model(**inputs).logits

        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P, prefix_projection=prefix_projection)
        peft_model = _peft_model(family, attn_implementation, config)
        peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
        theirs = peft_model(**inputs).logits

    assert (ours - base).abs().max() > 1e-2  # the prefix matters, or the comparison proves nothing
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_position_offset_zero_differs_from_peft(family: str) -> None:
    """With ``position_offset=0`` the real tokens keep the model's own positions, so PEFT's
    logits differ: the default offset is what makes the parity hold."""
    inputs = text_batch(family, 2, BATCH_SEED, right_pad=[0, 3])
    model = build(family, "sdpa", MODEL_SEED)
    with torch.no_grad():
        with attach_random_prefix(model, P, position_offset=0) as handle:
            ours = model(**inputs).logits
        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
        peft_model = _peft_model(family, "sdpa", config)
        peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
        theirs = peft_model(**inputs).logits
    assert (ours - theirs).abs().max() > 1e-4


def test_bert_with_token_types_matches_peft() -> None:
    """Segment ids pass through untouched (PEFT keeps them too)."""
    inputs = text_batch("bert", 2, BATCH_SEED, right_pad=[0, 2])
    inputs["token_type_ids"] = (torch.arange(inputs["input_ids"].shape[1]) >= 3).long().expand(2, -1)  # (B, T)
    model = build("bert", "sdpa", MODEL_SEED)
    with torch.no_grad():
        with attach_random_prefix(model, P) as handle:
            ours = model(**inputs).logits
            without_types = model(**{**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])}).logits
        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
        peft_model = _peft_model("bert", "sdpa", config)
        peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
        theirs = peft_model(**inputs).logits
    assert (ours - without_types).abs().max() > 1e-4  # the segment ids matter
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
