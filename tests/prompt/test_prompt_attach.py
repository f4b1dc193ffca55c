"""attach_prompt's mechanism against hand-written oracles: the mask extension, positions, token
types, labels, output trimming, ``disabled()``, combinations with other adapters, bad input, and
a coverage sweep over every text family.

The oracle of a forward is the model itself, detached, called with
``inputs_embeds = cat(prompt, embed(input_ids))`` and a mask with ``P`` ones in front.
"""

from __future__ import annotations

from typing import Any

import pytest
import tiny_encoders
import tiny_models
import torch
from restoration import assert_untouched, snapshot
from tiny_prompt import FAMILIES, GENERATING, UNSUPPORTED, build, example_inputs, randomise_prompt
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import LoraConfig, PrefixTuningConfig, attach_lora, attach_prefix
from prefix_hooks.prompt import PromptAttachment, PromptEncoderConfig, PromptTuningConfig, attach_prompt

P = 3  # num_virtual_tokens
BSZ = 2
SEQ_LEN = 6
ATOL = 1e-5


def _attached(model: PreTrainedModel, **fields: Any) -> PromptAttachment:
    return randomise_prompt(attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P, **fields)))


def _oracle(model: PreTrainedModel, handle: PromptAttachment, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The detached model on ``cat(prompt, embed(input_ids))`` with the mask extended by hand."""
    assert not handle.is_attached
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        prompt = handle.prompt_encoder.embedding.weight.expand(ids.shape[0], P, -1)  # (B, P, D)
        embeds = torch.cat((prompt, model.get_input_embeddings()(ids)), dim=1)  # (B, P + L, D)
        extended = torch.cat((torch.ones(ids.shape[0], P, dtype=mask.dtype), mask), dim=1)  # (B, P + L)
        return model(inputs_embeds=embeds, attention_mask=extended, **kwargs)


# --- the mask --------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ("eager", "sdpa"))
@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_mask_is_extended_not_shifted(family: str, attn: str) -> None:
    """Without P ones in front, transformers pads the short mask and hides the *last* P real tokens."""
    model = tiny_models.build_model(family, attn)
    handle = _attached(model, virtual_token_placement="peft")  # the oracle's layout: [virtual][pads][tokens]
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=1, left_pad=[0, 2])
    expected = _oracle(model, handle, batch).logits[:, P:]
    with torch.no_grad():
        prompt = handle.prompt_encoder.embedding.weight.expand(BSZ, P, -1)
        embeds = torch.cat((prompt, model.get_input_embeddings()(batch["input_ids"])), dim=1)
        broken = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, P:]
        with handle:
            got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - broken).abs().max() > 1e-3


def test_a_4d_mask_is_refused_with_its_shape() -> None:
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(BSZ, SEQ_LEN)
    mask = torch.ones(BSZ, 1, SEQ_LEN, SEQ_LEN, dtype=torch.bool)
    with _attached(model), pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1, 6, 6\)"):
        model(input_ids=batch["input_ids"], attention_mask=mask)


def test_no_mask_means_everything_attended() -> None:
    model = tiny_models.build_model("llama")
    handle = _attached(model)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=2)
    expected = _oracle(model, handle, batch).logits[:, P:]
    with torch.no_grad(), handle:
        got = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# --- positions, token types, inputs_embeds ------------------------------------------------------
@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_position_ids_follow_the_virtual_tokens(family: str) -> None:
    """Given positions 0..L-1 equal no positions (the model counts over P + L); a left-padded row
    with positions from its mask equals the row alone."""
    model = tiny_models.build_model(family)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=3, left_pad=[0, 2])
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, L)
    with torch.no_grad(), _attached(model):
        plain = model(**tiny_models.random_batch(BSZ, SEQ_LEN, seed=3)).logits
        counted = model(**tiny_models.random_batch(BSZ, SEQ_LEN, seed=3), position_ids=torch.arange(SEQ_LEN)).logits
        padded = model(**batch, position_ids=positions).logits
        alone = model(input_ids=batch["input_ids"][1:, 2:]).logits
    torch.testing.assert_close(counted, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1:, 2:], alone, atol=ATOL, rtol=0)


def test_token_type_ids_get_zeros_in_front() -> None:
    model = tiny_encoders.build_head("bert", "sequence")
    handle = _attached(model)
    batch = tiny_encoders.text_batch("bert", BSZ, seed=4, right_pad=[0, 2])
    token_types = torch.zeros_like(batch["input_ids"])
    token_types[:, 3:] = 1
    with torch.no_grad():
        extended = torch.cat((torch.zeros(BSZ, P, dtype=torch.long), token_types), dim=1)
        expected = _oracle(model, handle, batch, token_type_ids=extended).logits
        with handle:
            got = model(**batch, token_type_ids=token_types).logits
            without = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - without).abs().max() > 1e-4  # the token types reached the model


def test_user_inputs_embeds_get_the_prompt_too() -> None:
    model = tiny_models.build_model("llama")
    handle = _attached(model)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=5)
    with torch.no_grad(), handle:
        from_ids = model(**batch).logits
        embeds = model.get_input_embeddings()(batch["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(from_embeds, from_ids, atol=0, rtol=0)


# --- labels and output shapes -------------------------------------------------------------------
def test_token_classification_shapes_and_loss() -> None:
    """Trimmed logits line up with the user's labels: Trainer-style metrics work unchanged, and the
    model's loss (over P + L with -100 in front) equals the loss over the trimmed logits."""
    model = tiny_encoders.build_head("bert", "token", attn_implementation="eager")  # sdpa gives no attentions
    handle = _attached(model)
    batch = tiny_encoders.text_batch("bert", BSZ, seed=6, right_pad=[0, 2])
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, tiny_encoders.NUM_LABELS, (BSZ, tiny_encoders.SEQ_LEN), generator=generator)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    expected = _oracle(model, handle, batch, output_hidden_states=True, output_attentions=True)
    with torch.no_grad(), handle:
        out = model(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (BSZ, tiny_encoders.SEQ_LEN, tiny_encoders.NUM_LABELS)
    predictions = out.logits.argmax(-1)
    assert predictions.shape == labels.shape  # what compute_metrics compares
    loss = nn.functional.cross_entropy(out.logits.reshape(-1, tiny_encoders.NUM_LABELS), labels.reshape(-1))
    torch.testing.assert_close(out.loss, loss, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs[:, P:], atol=ATOL, rtol=0)  # (B, L, H)
    assert len(out.attentions) == len(expected.attentions) == 2
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours, theirs[:, :, P:], atol=ATOL, rtol=0)  # (B, heads, L, P + L): queries trimmed


@pytest.mark.parametrize("num_labels", (3, SEQ_LEN))
def test_sequence_classification_labels_are_not_extended(num_labels: int) -> None:
    """(B,) and multi-label (B, C) labels are per sequence, even when C equals the length."""
    model = tiny_encoders.build_head("bert", "sequence", num_labels=num_labels)
    handle = _attached(model)
    batch = tiny_encoders.text_batch("bert", BSZ, seed=7, length=SEQ_LEN)
    labels = torch.rand(BSZ, num_labels, generator=torch.Generator().manual_seed(2)).round()
    expected = _oracle(model, handle, batch, labels=labels)
    with torch.no_grad(), handle:
        got = model(**batch, labels=labels)
    assert got.logits.shape == (BSZ, num_labels)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


def test_causal_lm_loss_and_trimmed_outputs() -> None:
    model = tiny_models.build_model("llama")
    handle = _attached(model)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=8)
    labels = batch["input_ids"]
    extended = torch.cat((torch.full((BSZ, P), -100), labels), dim=1)
    expected = _oracle(model, handle, batch, labels=extended, output_hidden_states=True)
    with torch.no_grad(), handle:
        got = model(**batch, labels=labels, output_hidden_states=True)
        as_tuple = model(**batch, labels=labels, return_dict=False)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits[:, P:], atol=ATOL, rtol=0)
    for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs[:, P:], atol=ATOL, rtol=0)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], got.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], got.logits, atol=0, rtol=0)
    with handle, pytest.raises(ValueError, match=r"labels of shape \(2, 4\)"):
        model(**batch, labels=labels[:, :4])


def test_keep_virtual_outputs_keeps_every_position() -> None:
    model = tiny_models.build_model("gpt2", "eager")
    handle = _attached(model, keep_virtual_outputs=True)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=9)
    expected = _oracle(model, handle, batch, output_attentions=True)
    with torch.no_grad(), handle:
        got = model(**batch, output_hidden_states=True, output_attentions=True)
    assert got.logits.shape[:2] == (BSZ, P + SEQ_LEN)
    assert all(state.shape[1] == P + SEQ_LEN for state in got.hidden_states)
    assert len(got.attentions) == 2
    assert all(weights.shape[-2:] == (P + SEQ_LEN, P + SEQ_LEN) for weights in got.attentions)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)


def test_base_model_last_hidden_state_is_trimmed() -> None:
    model = tiny_encoders.build_head("bert", "features")
    handle = _attached(model)
    batch = tiny_encoders.text_batch("bert", BSZ, seed=10)
    expected = _oracle(model, handle, batch)
    with torch.no_grad(), handle:
        got = model(**batch)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state[:, P:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=ATOL, rtol=0)  # pools position 0


# --- disabled, combinations -------------------------------------------------------------------------
def test_disabled_gives_base_outputs() -> None:
    model = tiny_models.build_model("llama")
    handle = _attached(model)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=11)
    with torch.no_grad():
        base = model(**batch).logits
        with handle:
            with handle.disabled():
                disabled = model(**batch).logits
            enabled = model(**batch).logits
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    assert (enabled - base).abs().max() > 1e-3


def test_prompt_refuses_a_second_prompt_or_a_prefix() -> None:
    model = tiny_models.build_model("llama")
    first = _attached(model)
    second = attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=2), adapter_name="other")
    prefix = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2))
    before = snapshot(model)
    with first, pytest.raises(RuntimeError, match="already carries the prompt adapter 'default'"):
        second.attach()
    with prefix, pytest.raises(RuntimeError, match="already carries the prefix adapter 'default'"):
        first.attach()
    assert_untouched(model, before)


def test_prompt_with_lora_on_the_embedding() -> None:
    """The prompt goes in front of what the LoRA-swapped embedding gives; both train."""
    model = tiny_models.build_model("llama")
    lora = attach_lora(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    handle = _attached(model)
    batch = tiny_models.random_batch(BSZ, SEQ_LEN, seed=12)
    with torch.no_grad(), lora:
        expected = _oracle(model, handle, batch).logits[:, P:]
        with handle:
            got = model(**batch).logits
        without_prompt = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - without_prompt).abs().max() > 1e-3
    with lora, handle:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*lora.parameters(), *handle.parameters()]}


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (PrefixTuningConfig(num_virtual_tokens=2), TypeError, "PromptTuningConfig or PromptEncoderConfig, got"),
        (
            PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2),
            ValueError,
            "num_transformer_submodules=2 applies to encoder-decoder models",
        ),
        (
            PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["no_such_head"]),
            ValueError,
            r"modules_to_save entries \['no_such_head'\] match no module",
        ),
        (PromptTuningConfig(num_virtual_tokens=2, token_dim=7), ValueError, "token_dim=7"),
    ],
)
def test_bad_configs_are_refused_before_anything_changes(config: Any, error: type[Exception], match: str) -> None:
    model = tiny_models.build_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        attach_prompt(model, config)
    assert_untouched(model, before)


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_models_without_token_inputs_are_refused(family: str) -> None:
    with pytest.raises(ValueError, match=f"model_type='{family}'"):
        attach_prompt(build(family), PromptTuningConfig(num_virtual_tokens=P))


# --- every text family ---------------------------------------------------------------------------------
def _run(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    ("family", "attn"), [(family, attn) for family, implementations in FAMILIES.items() for attn in implementations]
)
def test_every_text_family(family: str, attn: str) -> None:
    """The prompt changes the logits (at the user's shape), generate with a cache equals without,
    and detach leaves no trace."""
    model: Any = build(family, attn)
    inputs = example_inputs(family)
    with torch.no_grad():
        model(**inputs, output_attentions=True, output_hidden_states=True)  # transformers' lazy hooks
    before = snapshot(model)
    base = _run(model, inputs)
    handle = _attached(model)
    with handle:
        got = _run(model, inputs)
        if family in GENERATING:
            prompt_inputs = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
            runs = [
                model.generate(
                    **prompt_inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=0,
                )
                for use_cache in (True, False)
            ]
            assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
            for cached, uncached in zip(runs[0].scores, runs[1].scores, strict=True):
                torch.testing.assert_close(cached, uncached, atol=ATOL, rtol=0)
    assert got.shape == base.shape
    assert (got - base).abs().max() > 1e-4
    assert_untouched(model, before)
    torch.testing.assert_close(_run(model, inputs), base, atol=0, rtol=0)
