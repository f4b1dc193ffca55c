"""Encoder-decoder prefixes: PEFT parity in the ``peft`` layout, config validation, no trace.

PEFT 0.21 (``SEQ_2_SEQ_LM``) is the oracle for the ``peft`` layout: on identical base weights
and the same ``prompt_embeddings`` its logits and generated tokens must match ours. PEFT runs
through ``bridge_peft_cache_keyword``. Its cached generate() drops the prefix on transformers
5.24+ (``PEFT_CACHE_KEYWORD_STALE``, see test_peft_breakage.py), so generate() is checked against
PEFT's forward on the generated tokens on every version, and against PEFT's generate() where
that is right.
"""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot
from shared_fixtures import PEFT_CACHE_KEYWORD_STALE, bridge_peft_cache_keyword
from tiny_models import build_model
from tiny_seq2seq import (
    DEEP_DECODER,
    FAMILIES,
    build,
    decoder_input_ids,
    depths,
    encoder_inputs,
    example_inputs,
    randomise,
)
from transformers import PreTrainedModel

from prefix_hooks import PrefixTuningConfig, attach_prefix, attachments_of

P = 3  # num_virtual_tokens
ATOL = 1e-5
PAD = [0, 3]
NEW_TOKENS = 4
PEFT_CASES = [  # (family, attn_implementation, num_layers, model overrides)
    *[(family, impl, None, {}) for family in ("t5", "bart") for impl in ("eager", "sdpa")],
    ("t5", "sdpa", 3, {}),  # an odd num_layers: decoder layer i reads slot 2i mod 3
    ("bart", "sdpa", 3, DEEP_DECODER["bart"]),  # a deeper decoder works in PEFT once num_layers >= its depth
    ("t5", "sdpa", None, {"num_decoder_layers": 1}),  # a shallower decoder reads slot 0 only
]


def _case_id(case: tuple[str, str, int | None, dict[str, Any]]) -> str:
    family, impl, num_layers, overrides = case
    depth = "".join(f"-{key}{value}" for key, value in overrides.items())
    return f"{family}-{impl}" + (f"-num_layers{num_layers}" if num_layers else "") + depth


def _peft_model(family: str, impl: str, num_layers: int | None, overrides: dict[str, Any], projection: bool) -> Any:
    config = peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, num_layers=num_layers, prefix_projection=projection
    )
    return bridge_peft_cache_keyword(peft.get_peft_model(build(family, impl, **overrides), config).eval())


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("case", PEFT_CASES, ids=_case_id)
def test_seq2seq_logits_match_peft(case: tuple[str, str, int | None, dict[str, Any]], padded: bool, projection: bool) -> None:
    family, impl, num_layers, overrides = case
    inputs = {**encoder_inputs(family, pad=PAD if padded else None), "decoder_input_ids": decoder_input_ids()}
    model = build(family, impl, **overrides)
    config = PrefixTuningConfig(
        num_virtual_tokens=P, num_layers=num_layers, prefix_projection=projection, encoder_decoder_layout="peft"
    )
    handle = attach_prefix(model, config)
    randomise(handle.encoder)
    with torch.no_grad():
        base = model(**inputs).logits
        with handle:
            ours = model(**inputs).logits

    peft_model = _peft_model(family, impl, num_layers, overrides, projection)
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())  # strict: same shapes
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert handle.config.num_layers == peft_model.peft_config["default"].num_layers
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_generate_matches_peft(family: str) -> None:
    inputs = encoder_inputs(family, pad=PAD)
    model: Any = build(family)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout="peft"))
    randomise(handle.encoder)
    kwargs: dict[str, Any] = {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
        "return_dict_in_generate": True, "output_scores": True, "output_logits": True,
    }
    with torch.no_grad(), handle:
        ours = model.generate(**inputs, **kwargs)
    peft_model = _peft_model(family, "sdpa", None, {}, projection=False)
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    with torch.no_grad():
        # PEFT's forward over the tokens we generated, one call without generate()'s cache
        teacher_forced = peft_model(**inputs, decoder_input_ids=ours.sequences[:, :-1]).logits  # (B, NEW_TOKENS, V)
    torch.testing.assert_close(torch.stack(ours.logits, dim=1), teacher_forced, atol=ATOL, rtol=0)
    if not PEFT_CACHE_KEYWORD_STALE:  # there PEFT's own generate() is right too
        with torch.no_grad():
            theirs = peft_model.generate(**inputs, **kwargs)
        assert torch.equal(ours.sequences, theirs.sequences)
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=ATOL, rtol=0)


def test_seq2seq_full_layout_has_a_slot_per_attention_layer() -> None:
    model = build("t5", num_decoder_layers=3)
    depth_e, depth_d = depths(model)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    assert handle.config.num_layers == depth_e + 2 * depth_d
    assert handle.config.num_transformer_submodules == 2
    assert handle.config.encoder_decoder_layout == "full"
    assert handle.encoder.embedding.weight.shape == (P, (depth_e + 2 * depth_d) * 2 * model.config.d_model)


# --- validation ---------------------------------------------------------------------------------
def _attach_error(model: PreTrainedModel, **config: Any) -> str:
    with pytest.raises(ValueError) as error:
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, **config))
    assert not attachments_of(model)
    return str(error.value)


def test_seq2seq_layout_value_is_validated() -> None:
    with pytest.raises(ValueError, match=r"encoder_decoder_layout='both' is not accepted; expected 'full'.*'peft'"):
        PrefixTuningConfig(encoder_decoder_layout="both")


def test_seq2seq_layout_is_refused_on_a_decoder_only_model() -> None:
    message = _attach_error(build_model("llama"), encoder_decoder_layout="peft")
    assert "encoder_decoder_layout='peft' applies to encoder-decoder models" in message


def test_seq2seq_one_submodule_is_refused() -> None:
    message = _attach_error(build("t5"), num_transformer_submodules=1)
    assert "num_transformer_submodules=1" in message and "set 2" in message


def test_seq2seq_full_layout_checks_num_layers() -> None:
    message = _attach_error(build("bart"), num_layers=2)
    assert "num_layers=2" in message and "6 prefix slots (2 encoder + 2 decoder self-attention + 2 cross" in message


def test_seq2seq_peft_layout_refuses_a_decoder_deeper_than_num_layers() -> None:
    message = _attach_error(build("bart", **DEEP_DECODER["bart"]), encoder_decoder_layout="peft")
    assert "num_layers=2" in message and "decoder has 3" in message and "num_layers >= 3" in message


def test_seq2seq_whisper_encoder_positions_cannot_shift() -> None:
    message = _attach_error(build("whisper"), position_offset=2)
    assert "position_offset=2" in message and "whisper's encoder positions" in message


# --- no trace -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["full", "peft"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_seq2seq_detach_leaves_no_trace(family: str, layout: str) -> None:
    model: Any = build(family, "eager")
    inputs = example_inputs(family)
    encoder_only = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    with torch.no_grad():  # let transformers install its lazy hooks and generation state first
        model(**inputs, output_attentions=True, output_hidden_states=True)
        model.generate(**encoder_only, max_new_tokens=2)
    before = snapshot(model)
    with torch.no_grad(), attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout)) as h:
        randomise(h.encoder)
        model(**inputs, output_attentions=True, output_hidden_states=True)
        model.generate(**encoder_only, max_new_tokens=2)
    assert_untouched(model, before)
