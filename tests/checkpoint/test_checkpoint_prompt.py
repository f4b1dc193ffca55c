"""Prompt-tuning and P-tuning checkpoints: our folders and PEFT's, both ways, with PEFT as the oracle.

* ours -> ours: the prompt, the P-tuning head and the logits come back bit for bit;
* PEFT ``save_pretrained`` -> ``load_adapter``: PEFT's logits (1e-5);
* ``save_adapter`` -> ``PeftModel.from_pretrained``: our logits (1e-5);
* resuming training (P-tuning's head restored from the extra file) continues the loss curve;
* each bad checkpoint raises a clear error and leaves the model as it was.

Cases: llama, llama with ``modules_to_save=["lm_head"]``, gpt2, bert sequence classification
(its classifier trained as a copy, as PEFT's task model does), t5 with PEFT's two prompt halves
(``num_transformer_submodules=2``); methods: prompt tuning, P-tuning MLP, P-tuning LSTM. PEFT
returns the virtual positions in a causal LM's logits; they are cut off before comparing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import tiny_encoders
import tiny_seq2seq
import torch
from restoration import assert_untouched, snapshot, warm_up
from test_checkpoint_prefix import EXTRA, WEIGHTS, _config, _drop, _set, randomise, rewrite, tensors_of
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import Attachment, attach
from prefix_hooks.checkpoint import load_adapter
from prefix_hooks.prompt import PromptAttachment, PromptEncoderConfig, PromptTuningConfig, attach_prompt
from prefix_hooks.prompt.modules import PromptEncoder, prompt_embeddings_to_save

P = 3
ATOL = 1e-5
MIN_EFFECT = 1e-2
HIDDEN = 24  # P-tuning's encoder_hidden_size
METHODS = ("prompt", "mlp", "lstm")


@dataclass(frozen=True)
class Case:
    build: Callable[[], PreTrainedModel]
    inputs: Callable[[], dict[str, torch.Tensor]]
    task_type: str
    fields: dict[str, Any] = field(default_factory=dict)  # fields of both configs, ours and PEFT's
    causal: bool = False  # compare logits at real positions; PEFT's carry P virtual ones in front


CASES: dict[str, Case] = {
    "llama": Case(
        lambda: build_model("llama"), lambda: random_batch(2, 5, seed=1, left_pad=[0, 2]), "CAUSAL_LM", causal=True
    ),
    "llama-lm-head": Case(
        lambda: build_model("llama"),
        lambda: random_batch(2, 5, seed=1, left_pad=[0, 2]),
        "CAUSAL_LM",
        fields={"modules_to_save": ["lm_head"]},
        causal=True,
    ),
    "gpt2": Case(
        lambda: build_model("gpt2"), lambda: random_batch(2, 5, seed=1, left_pad=[0, 2]), "CAUSAL_LM", causal=True
    ),
    "bert-seq-cls": Case(lambda: tiny_encoders.build("bert"), lambda: tiny_encoders.example_inputs("bert"), "SEQ_CLS"),
    "t5": Case(
        lambda: tiny_seq2seq.build("t5"),
        lambda: {
            **tiny_seq2seq.encoder_inputs("t5", pad=[0, 2]),
            "decoder_input_ids": tiny_seq2seq.decoder_input_ids(),
        },
        "SEQ_2_SEQ_LM",
        fields={"num_transformer_submodules": 2},
    ),
}


def _fields(case: Case, method: str) -> dict[str, Any]:
    fields = {"num_virtual_tokens": P, "task_type": case.task_type, **case.fields}
    if method != "prompt":
        fields.update(encoder_hidden_size=HIDDEN, encoder_reparameterization_type=method.upper())
    return fields


def trained(case: Case, method: str) -> PromptAttachment:
    """A fresh model of ``case`` and a prompt (plus head copies) with random weights."""
    fields = {**_fields(case, method), "virtual_token_placement": "peft"}  # left-padded inputs, compared with PEFT
    config = PromptTuningConfig(**fields) if method == "prompt" else PromptEncoderConfig(**fields)
    handle = attach_prompt(case.build(), config)
    randomise(list(handle.parameters()))
    return handle


def peft_trained(case: Case, method: str) -> peft.PeftModel:
    fields = _fields(case, method)
    config = peft.PromptTuningConfig(**fields) if method == "prompt" else peft.PromptEncoderConfig(**fields)
    model = peft.get_peft_model(case.build(), config).eval()
    randomise([p for _, p in sorted(model.named_parameters()) if p.requires_grad], seed=7)
    return model


def logits(model: nn.Module, inputs: dict[str, torch.Tensor], case: Case, virtual: int = 0) -> torch.Tensor:
    """The logits compared: at real positions for a causal LM (after ``virtual`` leading positions)."""
    with torch.no_grad():
        out = model(**inputs).logits
    return out[:, virtual:][inputs["attention_mask"].bool()] if case.causal else out


def logits_with(handle: Attachment, inputs: dict[str, torch.Tensor], case: Case) -> torch.Tensor:
    with handle:
        return logits(handle.model, inputs, case)


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_ours_to_ours_is_bitwise(name: str, method: str, tmp_path: Path) -> None:
    case = CASES[name]
    handle = trained(case, method)
    inputs = case.inputs()
    ours = logits_with(handle, inputs, case)
    assert (ours - logits(handle.model, inputs, case)).abs().max() > MIN_EFFECT
    handle.save(tmp_path / "a")
    assert (tmp_path / "a" / EXTRA).is_file() == (method != "prompt")

    frozen = load_adapter(handle.model, tmp_path / "a")
    assert isinstance(frozen, PromptAttachment) and not any(p.requires_grad for p in frozen.parameters())
    assert not (isinstance(frozen.prompt_encoder, PromptEncoder) and frozen.prompt_encoder.has_head)
    assert torch.equal(frozen.prompt_encoder.embedding.weight, prompt_embeddings_to_save(handle.prompt_encoder))
    assert torch.equal(logits_with(frozen, inputs, case), ours)

    resumed = load_adapter(handle.model, tmp_path / "a", trainable=True)
    assert isinstance(resumed, PromptAttachment) and resumed.config == handle.config
    mine, theirs = dict(resumed.named_parameters()), dict(handle.named_parameters())
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[key], theirs[key]) and mine[key].requires_grad for key in mine)
    assert torch.equal(logits_with(resumed, inputs, case), ours)
    resumed.save(tmp_path / "b")
    for file in (WEIGHTS, *([EXTRA] if method != "prompt" else [])):
        first, second = tensors_of(tmp_path / "a", file), tensors_of(tmp_path / "b", file)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_peft_checkpoint_gives_peft_logits(name: str, method: str, tmp_path: Path) -> None:
    case = CASES[name]
    peft_model = peft_trained(case, method)
    inputs = case.inputs()
    theirs = logits(peft_model, inputs, case, virtual=P)
    peft_model.save_pretrained(str(tmp_path))
    model = case.build()
    handle = load_adapter(model, tmp_path)
    assert isinstance(handle, PromptAttachment)
    assert (theirs - logits(model, inputs, case)).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits_with(handle, inputs, case), theirs, atol=ATOL, rtol=0)
    if method == "prompt":  # prompt tuning's whole state is PEFT's file: it resumes from it
        resumed = load_adapter(model, tmp_path, trainable=True)
        torch.testing.assert_close(logits_with(resumed, inputs, case), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_gives_our_logits_in_peft(name: str, method: str, tmp_path: Path) -> None:
    case = CASES[name]
    handle = trained(case, method)
    inputs = case.inputs()
    ours = logits_with(handle, inputs, case)
    handle.save(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, inputs, case, virtual=P), ours, atol=ATOL, rtol=0)


def test_text_init_config_loads_without_its_tokenizer(tmp_path: Path) -> None:
    """The saved prompt replaces the initialisation: loading never fetches the TEXT init's tokenizer."""
    case = CASES["llama"]
    handle = trained(case, "prompt")
    handle.save(tmp_path)
    text_init = {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "hello",
        "tokenizer_name_or_path": str(tmp_path / "none"),
    }
    rewrite(tmp_path, config=lambda data: data.update(text_init))
    for trainable in (False, True):
        loaded = load_adapter(case.build(), tmp_path, trainable=trainable)
        assert isinstance(loaded, PromptAttachment) and isinstance(loaded.config, PromptTuningConfig)
        assert loaded.config.prompt_tuning_init == "TEXT"
        assert torch.equal(loaded.prompt_encoder.embedding.weight, handle.prompt_encoder.embedding.weight)


# --- resume ---------------------------------------------------------------------------------------
def _train(handle: PromptAttachment, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    model = handle.model
    batch = random_batch(2, 6, seed=3)
    losses = []
    with handle:
        model.train()
        for _ in range(steps):
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_resume_continues_the_loss_curve(method: str, tmp_path: Path) -> None:
    """Six AdamW steps in one go equal three, a save, a trainable load into a fresh model and
    three more with the optimizer state carried over (same parameters in the same order)."""
    case = CASES["llama"]
    straight = trained(case, method)
    expected = _train(straight, torch.optim.AdamW(straight.parameters(), lr=1e-2), 6)

    first = trained(case, method)
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    losses = _train(first, optimizer, 3)
    first.save(tmp_path)
    resumed = load_adapter(case.build(), tmp_path, trainable=True)
    assert isinstance(resumed, PromptAttachment)
    assert [tuple(p.shape) for p in resumed.parameters()] == [tuple(p.shape) for p in first.parameters()]
    carried = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    carried.load_state_dict(optimizer.state_dict())
    losses += _train(resumed, carried, 3)
    assert expected[0] > expected[-1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=1e-6, rtol=0)


# --- bad checkpoints -----------------------------------------------------------------------------
BAD: dict[str, tuple[str, dict[str, Any], str]] = {  # name -> (method, rewrite edits, error pattern)
    "missing-prompt": ("prompt", {"tensors": _drop("prompt_embeddings")}, r"missing keys \['prompt_embeddings'\]"),
    "unexpected-key": ("mlp", {"tensors": _set("stray", torch.zeros(2))}, r"unexpected keys \['stray'\]"),
    "wrong-shape": (
        "prompt",
        {"tensors": _set("prompt_embeddings", torch.zeros(P + 1, 32))},
        r"shape \(4, 32\).*\(3, 32\)",
    ),
    "extra-for-prompt-tuning": ("prompt", {"extra": _set("embedding.weight", torch.zeros(P, 32))}, "no extra tensors"),
    "extra-missing-key": ("lstm", {"extra": _drop("lstm_head.bias_hh_l0")}, r"extra file.*missing keys \['lstm_head"),
    "extra-wrong-shape": (
        "mlp",
        {"extra": _set("mlp_head.0.weight", torch.zeros(HIDDEN + 1, 32))},
        r"'mlp_head.0.weight'",
    ),
    "extra-from-another-save": (
        "mlp",
        {"extra": _set("mlp_head.4.bias", torch.ones(32))},
        "differs from the saved 'prompt_embeddings'",
    ),
    "another-architecture": ("prompt", {"config": _config("token_dim", 48)}, r"token_dim=48.*width 32"),
    "two-stacks-on-a-decoder": (
        "prompt",
        {"config": _config("num_transformer_submodules", 2)},
        "num_transformer_submodules=2 applies to encoder-decoder",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_checkpoint_is_refused_and_model_untouched(name: str, tmp_path: Path) -> None:
    method, edits, pattern = BAD[name]
    case = CASES["llama"]
    trained(case, method).save(tmp_path)
    rewrite(tmp_path, **edits)
    model = case.build()
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, tmp_path, trainable=True)
    assert_untouched(model, before)


@pytest.mark.parametrize("method", ["mlp", "lstm"])
def test_peft_p_tuning_checkpoint_cannot_resume(method: str, tmp_path: Path) -> None:
    """PEFT saves only the encoder's output: trainable=True is refused (PEFT cannot resume it
    either); trainable=False loads it."""
    case = CASES["llama"]
    peft_trained(case, method).save_pretrained(str(tmp_path))
    model = case.build()
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="trainable=True.*only the encoder's output"):
        load_adapter(model, tmp_path, trainable=True)
    assert_untouched(model, before)
    assert isinstance(load_adapter(model, tmp_path), PromptAttachment)


def test_saved_config_is_peft_shaped(tmp_path: Path) -> None:
    """PEFT's keys at the top level (inference_mode true, as PEFT writes it), ours under "prefix_hooks"."""
    handle = trained(CASES["t5"], "lstm")
    handle.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "P_TUNING" and data["inference_mode"] is True
    assert data["num_transformer_submodules"] == 2 and data["token_dim"] == 32
    assert "keep_virtual_outputs" in data["prefix_hooks"] and "keep_virtual_outputs" not in data
    assert tuple(tensors_of(tmp_path)["prompt_embeddings"].shape) == (2 * P, 32)


@pytest.mark.parametrize("method", ["mlp", "lstm"])
def test_save_after_a_fused_optimizer_step_holds_the_trained_prompt(method: str, tmp_path: Path) -> None:
    """A fused AdamW step (the Trainer's default optimizer) does not bump version counters: the
    saved prompt must still be the one the trained head gives."""
    case = CASES["llama"]
    handle = trained(case, method)
    with torch.no_grad():
        handle.prompt_encoder.prompt(1)  # fills the encoder's no-grad cache
    _train(handle, torch.optim.AdamW(handle.parameters(), lr=0.1, fused=True), 1)
    handle.save(tmp_path)
    module = handle.prompt_encoder
    assert isinstance(module, PromptEncoder)
    with torch.no_grad():
        expected = module._encode(module.embedding.weight.unsqueeze(0))[0]  # (T, token_dim)
    assert torch.equal(tensors_of(tmp_path)["prompt_embeddings"], expected)
    load_adapter(case.build(), tmp_path, trainable=True)  # the extra file agrees with it


def test_attach_and_attach_prompt_take_a_peft_folder(tmp_path: Path) -> None:
    case = CASES["gpt2"]
    peft_model = peft_trained(case, "lstm")
    inputs = case.inputs()
    theirs = logits(peft_model, inputs, case, virtual=P)
    peft_model.save_pretrained(str(tmp_path))
    model = case.build()
    torch.testing.assert_close(
        logits_with(attach_prompt(model, str(tmp_path)), inputs, case), theirs, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(logits_with(attach(model, tmp_path), inputs, case), theirs, atol=ATOL, rtol=0)
