"""Prompt tuning's meaning where PEFT's layout gets it wrong: continuing a returned cache equals one
uninterrupted run, question-answering losses are over the user's positions, and a left-padded
row computes what it computes alone (the virtual tokens sit right before its first real token)."""

from __future__ import annotations

from typing import Any

import pytest
import tiny_encoders
import tiny_models
import torch
from shared_fixtures import cache_kwargs
from tiny_prompt import randomise_prompt
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    DynamicCache,
    PreTrainedModel,
)
from transformers.loss.loss_utils import ForQuestionAnsweringLoss

from prefix_hooks import PromptTuningConfig, attach_prompt
from prefix_hooks.core.transformers_compat import output_cache
from prefix_hooks.prompt import PromptAttachment
from prefix_hooks.prompt.inputs import (
    IGNORE_INDEX,
    prepend_filler,
    prepend_mask,
    prepend_positions,
    trim_virtual_outputs,
    virtual_offsets,
)

P = 3  # num_virtual_tokens
LENGTH = 6
FIRST_TOKENS = 3  # generated before the cache is handed back
MORE_TOKENS = 3  # generated when continuing it
ATOL = 1e-5
DECODERS = ("llama", "gpt2")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _attached(model: PreTrainedModel, **fields: Any) -> PromptAttachment:
    return randomise_prompt(attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P, **fields)), scale=2.0)


def _generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new: int, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kwargs,
        )


def _llama_head(auto_class: Any, **overrides: Any) -> PreTrainedModel:
    config = AutoConfig.for_model("llama", **{**tiny_models.FAMILY_CONFIGS["llama"], **overrides})
    torch.manual_seed(0)
    return auto_class.from_config(config, attn_implementation="sdpa").eval()


# --- 1. continuing a returned cache ---------------------------------------------------------
@pytest.mark.parametrize("left_pad", ([0], [0, 2]))
@pytest.mark.parametrize("family", DECODERS)
def test_generate_continuing_its_returned_cache_equals_one_generation(family: str, left_pad: list[int]) -> None:
    model = tiny_models.build_model(family)
    batch = tiny_models.random_batch(len(left_pad), LENGTH, seed=1, left_pad=left_pad)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with _attached(model):
        whole = _generate(model, ids, mask, FIRST_TOKENS + MORE_TOKENS)
        first = _generate(model, ids, mask, FIRST_TOKENS)
        cache = output_cache(first)
        assert cache.get_seq_length() == LENGTH + FIRST_TOKENS - 1  # real tokens only: generate() slices by it
        sequences = first.sequences
        grown = torch.cat((mask, mask.new_ones(mask.shape[0], FIRST_TOKENS)), dim=1)  # (B, L + 3)
        second = _generate(model, sequences, grown, MORE_TOKENS, **cache_kwargs(model, cache))
    assert second.sequences.tolist() == whole.sequences.tolist()
    for ours, theirs in zip(second.logits, whole.logits[FIRST_TOKENS:], strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_decode_loop_without_positions_continues_the_returned_cache(family: str) -> None:
    """The model counts positions from the cache it gets: the real one, virtual tokens included."""
    model = tiny_models.build_model(family)
    batch = tiny_models.random_batch(2, LENGTH, seed=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), _attached(model):
        full = model(input_ids=ids, attention_mask=mask).logits
        step = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        logits = [step.logits]
        for index in range(4, LENGTH):
            step = model(
                input_ids=ids[:, index : index + 1], attention_mask=mask[:, : index + 1],
                **cache_kwargs(model, output_cache(step)), use_cache=True,
            )
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=ATOL, rtol=0)
    assert isinstance(output_cache(step), DynamicCache)


def test_generate_with_a_raw_cache_holding_the_prompt_is_refused() -> None:
    """The caller's own cache object counts the virtual tokens; generate() would feed cached tokens
    again, so the call is refused (the returned ``out.cache`` continues exactly)."""
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(1, LENGTH, seed=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    own = DynamicCache()
    with _attached(model):
        first = _generate(model, ids, mask, FIRST_TOKENS, **cache_kwargs(model, own))
        grown = torch.cat((mask, mask.new_ones(1, FIRST_TOKENS)), dim=1)
        with pytest.raises(ValueError, match=r"continue from the cache the model returned \(out.cache"):
            _generate(model, first.sequences, grown, MORE_TOKENS, **cache_kwargs(model, own))


def test_a_returned_cache_is_refused_while_the_prompt_is_disabled() -> None:
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(1, LENGTH, seed=4)
    handle = _attached(model)
    with torch.no_grad(), handle:
        cache = output_cache(model(**batch, use_cache=True))
        with handle.disabled(), pytest.raises(RuntimeError, match="holds the 3 virtual tokens of the prompt 'default'"):
            model(input_ids=batch["input_ids"][:, -1:], **cache_kwargs(model, cache))


# --- 2. question answering --------------------------------------------------------------------
def _qa_models() -> dict[str, PreTrainedModel]:
    return {
        "bert": tiny_encoders.build_head("bert", "question_answering"),
        "llama": _llama_head(AutoModelForQuestionAnswering, num_labels=2),
    }


@pytest.mark.parametrize("keep_virtual_outputs", (False, True))
@pytest.mark.parametrize("family", ("bert", "llama"))
def test_question_answering_loss_is_over_the_users_positions(family: str, keep_virtual_outputs: bool) -> None:
    """The loss equals the base formula on the real positions' start/end logits, with the user's
    positions (one beyond the text: ignored, as the base model does)."""
    model = _qa_models()[family]
    batch = tiny_encoders.text_batch("bert", 3, seed=5) if family == "bert" else tiny_models.random_batch(3, 8, 5)
    length = batch["input_ids"].shape[1]
    start, end = torch.tensor([1, 0, length]), torch.tensor([3, length - 1, length])
    with torch.no_grad(), _attached(model, keep_virtual_outputs=keep_virtual_outputs):
        out = model(**batch, start_positions=start, end_positions=end)
        as_tuple = model(**batch, start_positions=start, end_positions=end, return_dict=False)
    start_logits, end_logits = out.start_logits[:, -length:], out.end_logits[:, -length:]  # (B, L) each
    expected = ForQuestionAnsweringLoss(start_logits, end_logits, start, end)
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(as_tuple[0], expected, atol=ATOL, rtol=0)  # loss first, as transformers returns it
    assert out.start_logits.shape == (3, length + P if keep_virtual_outputs else length)


# --- 3. left padding --------------------------------------------------------------------------
@pytest.mark.parametrize("with_positions", (False, True))
def test_a_left_padded_row_equals_the_row_alone(with_positions: bool) -> None:
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(2, LENGTH, seed=6, left_pad=[0, 2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, L)
    given = {"position_ids": positions} if with_positions else {}
    alone_given = {"position_ids": positions[1:, 2:]} if with_positions else {}
    with torch.no_grad(), _attached(model):
        padded = model(**batch, labels=labels, **given)
        alone = model(input_ids=batch["input_ids"][1:, 2:], labels=labels[1:, 2:], **alone_given)
        row = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                    labels=labels[1:], **({"position_ids": positions[1:]} if with_positions else {}))
    assert padded.logits.shape == (2, LENGTH, tiny_models.VOCAB)
    torch.testing.assert_close(padded.logits[1:, 2:], alone.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(row.loss, alone.loss, atol=ATOL, rtol=0)


def test_peft_placement_keeps_the_virtual_tokens_in_front_of_the_padding() -> None:
    """PEFT's layout, kept for parity: without positions a padded row is not the row alone."""
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(2, LENGTH, seed=6, left_pad=[0, 2])
    with torch.no_grad(), _attached(model, virtual_token_placement="peft"):
        padded = model(**batch).logits
        alone = model(input_ids=batch["input_ids"][1:, 2:]).logits
    assert (padded[1:, 2:] - alone).abs().max() > 1e-4


def test_a_left_padded_row_is_classified_as_alone() -> None:
    model = _llama_head(AutoModelForSequenceClassification, num_labels=3)
    batch = tiny_models.random_batch(3, LENGTH, seed=7, left_pad=[0, 2, 1])
    with torch.no_grad(), _attached(model):
        together = model(**batch).logits  # (B, 3)
        for row, pad in enumerate((0, 2, 1)):
            alone = model(input_ids=batch["input_ids"][row : row + 1, pad:]).logits
            torch.testing.assert_close(together[row : row + 1], alone, atol=ATOL, rtol=0)


def test_keep_virtual_outputs_returns_the_placed_layout() -> None:
    model = tiny_models.build_model("llama")
    batch = tiny_models.random_batch(2, LENGTH, seed=8, left_pad=[0, 2])
    with torch.no_grad(), _attached(model, keep_virtual_outputs=True):
        full = model(**batch).logits  # (B, P + L, V): row 1 is [pads][virtual][tokens]
    with torch.no_grad(), _attached(model):
        trimmed = model(**batch).logits
    assert full.shape == (2, P + LENGTH, tiny_models.VOCAB)
    torch.testing.assert_close(full[1, 2 + P :], trimmed[1, 2:], atol=0, rtol=0)
    torch.testing.assert_close(full[0, P:], trimmed[0], atol=0, rtol=0)


def test_inputs_are_placed_after_each_rows_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])  # left, none, right padding
    offsets = virtual_offsets(mask, "after_padding")
    assert offsets is not None and offsets.tolist() == [0, 2, 0]
    assert virtual_offsets(mask, "peft") is None
    assert virtual_offsets(torch.ones(2, 4), "after_padding") is None  # no row starts with padding
    assert prepend_mask(mask, 2, offsets).tolist() == [
        [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]
    ]
    labels = torch.tensor([[5, 6, 7, 8], [-100, -100, 7, 8], [5, 6, -100, -100]])
    assert prepend_filler(labels, 2, IGNORE_INDEX, offsets)[1].tolist() == [-100, -100, -100, -100, 7, 8]
    positions = prepend_positions(torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1], [0, 1, 2, 3]]), 2, offsets)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [2, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    hidden = torch.arange(3 * 6).reshape(3, 6, 1).float()  # (B, P + L, 1): each column its index
    trimmed = trim_virtual_outputs({"last_hidden_state": hidden}, 4, offsets)["last_hidden_state"]
    assert trimmed[..., 0].tolist() == [[2, 3, 4, 5], [6, 7, 10, 11], [14, 15, 16, 17]]


def test_placement_is_saved_beside_peft_keys_and_checked() -> None:
    saved = PromptTuningConfig(virtual_token_placement="peft").to_json_dict()
    assert saved["prefix_hooks"]["virtual_token_placement"] == "peft" and "virtual_token_placement" not in saved
    assert PromptTuningConfig().virtual_token_placement == "after_padding"
    with pytest.raises(ValueError, match=r"virtual_token_placement='front' is not accepted; expected one of"):
        PromptTuningConfig(virtual_token_placement="front")
