"""Any task head works with a prefix, because nothing is wrapped: the prefix lives in the
base encoder, and each head reads the base encoder's (prefixed) output as usual.

Oracle: a feature-extraction model (``AutoModel``) carrying the same prefix, with the
task model's base weights; the task head applied by hand to its outputs must give the
task model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_encoders import attach_random_prefix, build_head, text_batch
from transformers import PreTrainedModel

P = 4  # num_virtual_tokens
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
HEAD_SEED = 5
RIGHT_PAD = [0, 3]


def _sequence(model: Any, features: Any) -> dict[str, torch.Tensor]:
    return {"logits": model.classifier(features.pooler_output)}  # BERT: pooled CLS -> classifier


def _token(model: Any, features: Any) -> dict[str, torch.Tensor]:
    return {"logits": model.classifier(features.last_hidden_state)}


def _question_answering(model: Any, features: Any) -> dict[str, torch.Tensor]:
    start, end = model.qa_outputs(features.last_hidden_state).split(1, dim=-1)  # (B, T, 1) each
    return {"start_logits": start.squeeze(-1), "end_logits": end.squeeze(-1)}


HEADS_BY_HAND: dict[str, Callable[[Any, Any], dict[str, torch.Tensor]]] = {
    "sequence": _sequence,
    "token": _token,
    "question_answering": _question_answering,
}


def _features_model(task_model: PreTrainedModel) -> PreTrainedModel:
    features = build_head("bert", "features", "sdpa", HEAD_SEED)
    missing, unexpected = features.load_state_dict(task_model.base_model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("pooler.") for key in missing), (missing, unexpected)
    return features


@pytest.mark.parametrize("head", sorted(HEADS_BY_HAND))
def test_bert_task_head_reads_the_prefixed_encoder(head: str) -> None:
    model = build_head("bert", head, "sdpa", MODEL_SEED)
    features_model = _features_model(model)
    inputs = text_batch("bert", 2, BATCH_SEED, right_pad=RIGHT_PAD)
    with torch.no_grad():
        base = model(**inputs)
        with attach_random_prefix(model, P), attach_random_prefix(features_model, P):
            ours = model(**inputs)
            expected = HEADS_BY_HAND[head](model, features_model(**inputs))
    for name, value in expected.items():
        assert ours[name].shape == base[name].shape
        assert (ours[name] - base[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(ours[name], value, atol=ATOL, rtol=0)


def test_bert_feature_extraction_changes_and_keeps_shapes() -> None:
    model = build_head("bert", "features", "sdpa", MODEL_SEED)
    inputs = text_batch("bert", 2, BATCH_SEED, right_pad=RIGHT_PAD)
    with torch.no_grad():
        base = model(**inputs)
        with attach_random_prefix(model, P):
            ours = model(**inputs)
    for name in ("last_hidden_state", "pooler_output"):
        assert ours[name].shape == base[name].shape
        assert (ours[name] - base[name]).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["token", "question_answering"])
@pytest.mark.parametrize("family", ["distilbert", "roberta", "electra", "modernbert"])
def test_other_encoder_task_heads_run_with_a_prefix(family: str, head: str) -> None:
    model = build_head(family, head, "sdpa", MODEL_SEED)
    inputs = text_batch(family, 2, BATCH_SEED, right_pad=RIGHT_PAD)
    with torch.no_grad():
        base = model(**inputs)
        with attach_random_prefix(model, P):
            ours = model(**inputs)
    name = "logits" if head == "token" else "start_logits"
    assert ours[name].shape == base[name].shape
    assert (ours[name] - base[name]).abs().max() > 1e-3
