"""Parity with PEFT: the same prefix tensor gives the same logits through our hooks as
through ``peft.get_peft_model`` (PEFT is the oracle).

PEFT puts the prefix into the cache and places the real tokens at positions
``P..P+n-1``; we splice it into each attention call and offset ``position_ids`` by
``P`` (the default ``position_offset=None``). Both must agree to fp32 round-off at
every real token, for every family and attention backend, with and without left
padding and with and without the projection MLP.
"""

from __future__ import annotations

import peft
import pytest
import torch
from shared_fixtures import bridge_peft_cache_keyword
from tiny_models import build_model, family_backend_pairs, random_batch
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

P = 4  # num_virtual_tokens
BATCH = 2
SEQ_LEN = 7
LEFT_PAD = [0, 3]  # row 0 unpadded, row 1 with three pad tokens on the left
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
PREFIX_SEED = 2


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    return random_batch(BATCH, SEQ_LEN, seed=BATCH_SEED, left_pad=LEFT_PAD if padded else None)


def _randomise(handle: PrefixAttachment) -> None:
    """Give the encoder non-trivial weights (normal, fixed seed) so the prefix matters."""
    generator = torch.Generator().manual_seed(PREFIX_SEED)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _peft_model(
    family: str, attn_implementation: str, *, prefix_projection: bool, inference_mode: bool = False
) -> peft.PeftModel:
    """A PEFT prefix-tuning model on a fresh base built with the same seed as ours."""
    base = build_model(family, attn_implementation, seed=MODEL_SEED)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prefix_projection=prefix_projection,
        inference_mode=inference_mode,
    )
    return bridge_peft_cache_keyword(peft.get_peft_model(base, config).eval())


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits  # (B, T, V)


def _real(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at real (non-padding) positions only: (N_real, V)."""
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize(("family", "attn_implementation"), family_backend_pairs())
def test_logits_match_peft(family: str, attn_implementation: str, padded: bool, prefix_projection: bool) -> None:
    """Oracle: PEFT's ``get_peft_model`` with our encoder's state dict loaded into its
    ``prompt_encoder``; logits at real tokens agree within 1e-5."""
    batch = _batch(padded)
    model: PreTrainedModel = build_model(family, attn_implementation, seed=MODEL_SEED)
    base_logits = _logits(model, batch)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=prefix_projection))
    _randomise(handle)
    with handle:
        ours = _logits(model, batch)

    peft_model = _peft_model(family, attn_implementation, prefix_projection=prefix_projection)
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    theirs = _logits(peft_model, batch)

    # The prefix must actually change the outputs, or the comparison proves nothing.
    assert (_real(ours, batch) - _real(base_logits, batch)).abs().max() > 1e-2
    torch.testing.assert_close(_real(ours, batch), _real(theirs, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_position_offset_zero_differs_from_peft(family: str) -> None:
    """Oracle: PEFT (real tokens at positions ``P..``). With ``position_offset=0`` our
    real tokens keep positions ``0..``, so the logits must differ: the offset matters,
    and the default (``None`` = ``P``) is what makes the parity test pass."""
    batch = _batch(padded=True)
    model = build_model(family, "sdpa", seed=MODEL_SEED)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, position_offset=0))
    _randomise(handle)
    with handle:
        ours = _logits(model, batch)

    peft_model = _peft_model(family, "sdpa", prefix_projection=False)
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    theirs = _logits(peft_model, batch)

    assert (_real(ours, batch) - _real(theirs, batch)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_weight_reproduces_projection_in_peft_inference_mode(family: str) -> None:
    """Oracle: a PEFT model in ``inference_mode=True`` (a plain embedding, no MLP) with
    our ``folded_weight()`` as its embedding reproduces our projection-mode logits."""
    batch = _batch(padded=True)
    model = build_model(family, "sdpa", seed=MODEL_SEED)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
    _randomise(handle)
    with handle:
        ours = _logits(model, batch)
    folded = handle.encoder.folded_weight()  # (P, L*2*token_dim)

    peft_model = _peft_model(family, "sdpa", prefix_projection=True, inference_mode=True)
    encoder = peft_model.prompt_encoder["default"]
    assert not hasattr(encoder, "transform")  # inference mode: a plain embedding
    encoder.load_state_dict({"embedding.weight": folded})
    theirs = _logits(peft_model, batch)

    torch.testing.assert_close(_real(ours, batch), _real(theirs, batch), atol=ATOL, rtol=0)


def test_grouped_query_dims_match_peft_config() -> None:
    """Oracle: the ``token_dim``/``num_attention_heads`` PEFT writes into its own config
    after ``get_peft_model``. For llama (4 heads, 2 key/value heads) both are the
    key/value width and head count, not the query ones."""
    model = build_model("llama", "sdpa", seed=MODEL_SEED)
    kv_heads = model.config.num_key_value_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert kv_heads < model.config.num_attention_heads  # really grouped-query

    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    peft_config = _peft_model("llama", "sdpa", prefix_projection=False).peft_config["default"]
    assert isinstance(peft_config, peft.PrefixTuningConfig)

    assert handle.config.token_dim == kv_heads * head_dim
    assert handle.config.num_attention_heads == kv_heads
    assert handle.config.token_dim == peft_config.token_dim
    assert handle.config.num_attention_heads == peft_config.num_attention_heads
    assert handle.config.num_layers == peft_config.num_layers
    assert handle.config.encoder_hidden_size == peft_config.encoder_hidden_size
