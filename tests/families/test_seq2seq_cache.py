"""Encoder-decoder prefixes with the model's cache: the oracle is the same model without it.

* Decoding in chunks with an ``EncoderDecoderCache`` gives the logits of one forward without
  cache; the self-attention cache holds only real tokens and the cross-attention cache holds
  exactly the keys/values the base model caches (no prefix).
* ``generate()`` with and without cache agree (greedy and beam search), for every family and
  both layouts, including decoders deeper than their encoder.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from shared_fixtures import cache_kwargs
from tiny_seq2seq import DEEP_DECODER, FAMILIES, build, decoder_input_ids, encoder_inputs, randomise

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import output_cache

P = 3  # num_virtual_tokens
ATOL = 1e-5
DECODE_LEN = 6
PREFILL = 3  # decoder tokens in the first cached call; the rest come one at a time
NEW_TOKENS = 5
LAYOUTS = ["full", "peft"]
CASES = [
    *[(family, layout, {}) for family in FAMILIES for layout in LAYOUTS],
    *[(family, "full", DEEP_DECODER[family]) for family in ("t5", "bart", "whisper")],
]
# transformers 5.23's generate() sizes T5's cache by the encoder depth, so a deeper T5 decoder
# fails there even without a prefix; its deep case runs in the chunked-decoding test only.
GENERATE_CASES = [case for case in CASES if not (case[0] == "t5" and case[2])]


def _ids(case: tuple[str, str, dict[str, Any]]) -> str:
    family, layout, overrides = case
    return f"{family}-{layout}" + ("-deep_decoder" if overrides else "")


def _config(layout: str) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout)


def _encoder_inputs(family: str) -> dict[str, torch.Tensor]:
    return encoder_inputs(family, pad=None if family == "whisper" else [0, 2])


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_seq2seq_chunked_decoding_matches_full_forward(case: tuple[str, str, dict[str, Any]]) -> None:
    family, layout, overrides = case
    model = build(family, **overrides)
    inputs = _encoder_inputs(family)
    decoder_ids = decoder_input_ids(length=DECODE_LEN)
    with torch.no_grad(), attach_prefix(model, _config(layout)) as handle:
        randomise(handle.encoder)
        full = model(**inputs, decoder_input_ids=decoder_ids, use_cache=False).logits  # (B, T, V)
        encoder_outputs = model.get_encoder()(**inputs)
        shared = {"encoder_outputs": encoder_outputs, "attention_mask": inputs.get("attention_mask"), "use_cache": True}
        out = model(**shared, decoder_input_ids=decoder_ids[:, :PREFILL])
        steps = [out.logits]
        for t in range(PREFILL, DECODE_LEN):
            out = model(**shared, decoder_input_ids=decoder_ids[:, t : t + 1], **cache_kwargs(model, output_cache(out)))
            steps.append(out.logits)
        cache = output_cache(out)
        with handle.disabled():
            base_cache = output_cache(model(**shared, decoder_input_ids=decoder_ids))

    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == DECODE_LEN  # real tokens only
    encoder_len = encoder_outputs.last_hidden_state.shape[1]
    for layer, base_layer in zip(cache.cross_attention_cache.layers, base_cache.cross_attention_cache.layers, strict=True):
        assert layer.keys.shape[-2] == encoder_len
        torch.testing.assert_close(layer.keys, base_layer.keys, atol=0, rtol=0)
        torch.testing.assert_close(layer.values, base_layer.values, atol=0, rtol=0)


def _generate(model: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    return model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        return_dict_in_generate=True, output_scores=True, **kwargs,
    )


@pytest.mark.parametrize("case", GENERATE_CASES, ids=_ids)
def test_seq2seq_generate_with_cache_matches_without(case: tuple[str, str, dict[str, Any]]) -> None:
    family, layout, overrides = case
    model = build(family, **overrides)
    inputs = _encoder_inputs(family)
    with torch.no_grad():
        base = _generate(model, inputs)
        with attach_prefix(model, _config(layout)) as handle:
            randomise(handle.encoder)
            cached = _generate(model, inputs, use_cache=True)
            uncached = _generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=ATOL, rtol=0)
    finite = torch.isfinite(base.scores[0])  # min_new_tokens masks EOS with -inf
    assert (cached.scores[0] - base.scores[0])[finite].abs().max() > 1e-2  # the prefix is used


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_beam_search_with_cache_matches_without(family: str) -> None:
    """Beam search reorders the cache; the prefix is not in it, so nothing needs reordering."""
    model: Any = build(family)
    inputs = _encoder_inputs(family)
    with torch.no_grad(), attach_prefix(model, _config("full")) as handle:
        randomise(handle.encoder)
        cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_static_cache_matches_dynamic(family: str, layout: str) -> None:
    """A StaticCache presents all its slots as keys (T5's bias and masks must span them)."""
    model = build(family)
    inputs = _encoder_inputs(family)
    with torch.no_grad(), attach_prefix(model, _config(layout)) as handle:
        randomise(handle.encoder)
        dynamic = _generate(model, inputs)
        static = _generate(model, inputs, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=ATOL, rtol=0)
