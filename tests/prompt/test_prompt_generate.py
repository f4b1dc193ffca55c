"""generate() with a prompt attached: PEFT's greedy tokens, the cache against no cache (greedy
and beam search), left-padded rows against the rows alone, a hand-written decode loop on the
returned cache, and encoder-decoders (t5, bart) against PEFT.

Where transformers names the cache ``cache`` (5.24+, ``PEFT_CACHE_KEYWORD_STALE``) PEFT 0.21.2's
cached decoder generate() prepends the prompt again at every step (measured in
test_peft_breakage.py); there the oracle is PEFT's generate() without cache, which prepends the
prompt to the whole sequence at every step and so never reads the cache PEFT mishandles."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import tiny_models
import tiny_seq2seq
import torch
from shared_fixtures import PEFT_CACHE_KEYWORD_STALE, cache_kwargs
from tiny_prompt import randomise_prompt
from transformers import DynamicCache, PreTrainedModel

from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters, output_cache
from prefix_hooks.prompt import PromptAttachment, PromptEncoderConfig, PromptTuningConfig, attach_prompt

P = 3  # num_virtual_tokens
NEW_TOKENS = 6
ATOL = 1e-5
DECODERS = ("llama", "gpt2")
SEQ2SEQ = ("t5", "bart")
CONFIGS = ("prompt", "p_tuning_lstm")


def _attached(model: PreTrainedModel, kind: str = "prompt") -> PromptAttachment:
    config: PromptTuningConfig | PromptEncoderConfig = (
        PromptTuningConfig(num_virtual_tokens=P)
        if kind == "prompt"
        else PromptEncoderConfig(num_virtual_tokens=P, encoder_reparameterization_type="LSTM")
    )
    return randomise_prompt(attach_prompt(model, config), scale=2.0)


def _generate(model: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=0, **kwargs,
        )


def _assert_same_generation(got: Any, expected: Any) -> None:
    assert got.sequences.tolist() == expected.sequences.tolist()
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_tokens_equal_peft(family: str, kind: str) -> None:
    model = tiny_models.build_model(family)
    handle = _attached(model, kind)
    peft_config = (
        peft.PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")
        if kind == "prompt"
        else peft.PromptEncoderConfig(
            num_virtual_tokens=P, task_type="CAUSAL_LM", encoder_reparameterization_type="LSTM"
        )
    )
    peft_model = peft.get_peft_model(tiny_models.build_model(family), peft_config).eval()
    peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict())
    inputs = tiny_models.random_batch(2, 5, seed=4)
    base = _generate(model, inputs)
    with handle:
        got = _generate(model, inputs)
    expected = _generate(peft_model, inputs, use_cache=not PEFT_CACHE_KEYWORD_STALE)
    _assert_same_generation(got, expected)
    assert got.sequences.tolist() != base.sequences.tolist()  # the prompt steers generation


@pytest.mark.parametrize("num_beams", (1, 3))
@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("family", DECODERS)
def test_cache_equals_no_cache(family: str, kind: str, num_beams: int) -> None:
    model = tiny_models.build_model(family)
    inputs = tiny_models.random_batch(2, 5, seed=5, left_pad=[0, 2])
    with _attached(model, kind):
        cached = _generate(model, inputs, num_beams=num_beams, use_cache=True)
        uncached = _generate(model, inputs, num_beams=num_beams, use_cache=False)
    _assert_same_generation(cached, uncached)
    if num_beams > 1:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_rows_equal_rows_alone(family: str) -> None:
    model = tiny_models.build_model(family)
    batch = tiny_models.random_batch(3, 6, seed=6, left_pad=[0, 3, 1])
    with _attached(model):
        together = _generate(model, batch)
        for row, pad in enumerate((0, 3, 1)):
            alone = _generate(model, {key: value[row : row + 1, pad:] for key, value in batch.items()})
            assert together.sequences[row, 6:].tolist() == alone.sequences[0, 6 - pad :].tolist()
            for ours, theirs in zip(together.scores, alone.scores, strict=True):
                torch.testing.assert_close(ours[row : row + 1], theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_decode_loop_on_returned_cache_equals_full_forward(family: str) -> None:
    """The cache a plain forward returns holds the virtual tokens but counts the real ones only;
    continuing it with the real tokens' 2-D mask gives the logits of one forward over the whole sequence."""
    model = tiny_models.build_model(family)
    batch = tiny_models.random_batch(2, 7, seed=7, left_pad=[0, 2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, 7): left padding does not move real positions
    with torch.no_grad(), _attached(model):
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        step = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], use_cache=True)
        cache = output_cache(step)
        assert cache.get_seq_length() == 5  # the real tokens: what generate() slices its inputs by
        logits = [step.logits]
        for index in (5, 6):
            step = model(
                input_ids=ids[:, index : index + 1], attention_mask=mask[:, : index + 1],
                position_ids=positions[:, index : index + 1], **cache_kwargs(model, cache), use_cache=True,
            )
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=ATOL, rtol=0)


def test_a_cache_without_the_virtual_tokens_is_refused() -> None:
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(1, 4)
    with torch.no_grad():
        foreign = output_cache(model(**batch, use_cache=True))  # computed without the prompt
        with _attached(model), pytest.raises(RuntimeError, match="already holds 4 positions"):
            model(input_ids=batch["input_ids"][:, -1:], **cache_kwargs(model, foreign))
        keyword = cache_keyword(forward_parameters(model))
        with _attached(model), pytest.raises(TypeError, match=f"^{keyword} of type tuple"):  # named as the caller passed it
            model(**batch, **cache_kwargs(model, ((torch.zeros(1),),)))
    assert isinstance(foreign, DynamicCache)


def test_user_inputs_embeds_generate_like_input_ids() -> None:
    model = tiny_models.build_model("llama")
    inputs = tiny_models.random_batch(2, 5, seed=8, left_pad=[0, 1])
    with _attached(model):
        from_ids = _generate(model, inputs)
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
        from_embeds = _generate(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    assert from_embeds.sequences.tolist() == from_ids.sequences[:, 5:].tolist()


def test_static_cache_is_refused_clearly() -> None:
    model = tiny_models.build_model("llama")
    with _attached(model), pytest.raises(ValueError, match="StaticCache is not supported with prompt tuning"):
        _generate(model, tiny_models.random_batch(2, 5), cache_implementation="static")


# --- encoder-decoders --------------------------------------------------------------------
@pytest.mark.parametrize("submodules", (1, 2))
@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_forward_and_generate_equal_peft(family: str, kind: str, submodules: int) -> None:
    """With ``num_transformer_submodules=2`` (PEFT's SEQ_2_SEQ_LM default) the module has 2P rows
    and, as in PEFT's prompt tuning / P-tuning, the encoder gets the first P (the decoder none)."""
    model = tiny_seq2seq.build(family)
    fields: dict[str, Any] = {"num_virtual_tokens": P, "num_transformer_submodules": submodules}
    lstm: dict[str, Any] = {} if kind == "prompt" else {"encoder_reparameterization_type": "LSTM"}
    fields["virtual_token_placement"] = "peft"  # ours only: t5's rows are left-padded, compared in PEFT's layout
    ours = PromptTuningConfig(**fields) if kind == "prompt" else PromptEncoderConfig(**fields, **lstm)
    del fields["virtual_token_placement"]
    handle = randomise_prompt(attach_prompt(model, ours), scale=2.0)
    theirs = (peft.PromptTuningConfig if kind == "prompt" else peft.PromptEncoderConfig)(
        task_type="SEQ_2_SEQ_LM", **fields, **lstm
    )
    peft_model = peft.get_peft_model(tiny_seq2seq.build(family), theirs).eval()
    peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict())
    encoder_inputs = tiny_seq2seq.encoder_inputs(family, pad=[0, 2])
    labels = tiny_seq2seq.decoder_input_ids()
    with torch.no_grad():
        expected = peft_model(**encoder_inputs, labels=labels)
        base = model(**encoder_inputs, labels=labels)
        with handle:
            got = model(**encoder_inputs, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    assert got.encoder_last_hidden_state.shape[1] == P + tiny_seq2seq.ENCODER_LEN  # documented: kept
    assert (got.logits - base.logits).abs().max() > 1e-3
    with handle:
        tokens = _generate(model, encoder_inputs)
    _assert_same_generation(tokens, _generate(peft_model, encoder_inputs))  # tokens and every step's scores


@pytest.mark.parametrize("num_beams", (1, 3))
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_cache_equals_no_cache(family: str, num_beams: int) -> None:
    model = tiny_seq2seq.build(family)
    encoder_inputs = tiny_seq2seq.encoder_inputs(family, pad=[0, 2])
    with _attached(model):
        cached = _generate(model, encoder_inputs, num_beams=num_beams, use_cache=True)
        uncached = _generate(model, encoder_inputs, num_beams=num_beams, use_cache=False)
    _assert_same_generation(cached, uncached)
