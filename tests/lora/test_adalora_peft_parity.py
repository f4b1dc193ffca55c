"""Parity with PEFT's AdaLoRA on identical weights (PEFT is the oracle), plus independent checks.

The same tiny model is built twice with the same seed; one copy is wrapped by ``peft.get_peft_model``
(with a ``task_type``, the PEFT path that adds the orthogonal regulariser), the other gets
``attach_adalora``. PEFT's factors get random non-zero values and are copied into ours by name; then
logits, the loss (with its orthogonal term) and every adapter gradient must agree to float32
round-off, and the orthogonal term must equal a hand-written formula.
"""

from __future__ import annotations

import contextlib
from typing import Any

import peft
import pytest
import torch
from tiny_adalora import CASES, PEFT_PREFIX, Case, adapter_parameters, copy_parameters, peft_config, peft_twin
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import AdaLoraConfig, adapter_rows, attach_adalora

ATOL = 1e-5
MIN_EFFECT = 1e-3  # the adapter must move the logits by more than this, or parity proves nothing
FAMILIES = list(CASES)


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def hand_orthogonal_term(model: nn.Module, weight: float) -> torch.Tensor:
    """``weight * mean ||A A^T - I||_F, ||B^T B - I||_F`` over the model's AdaLoRA factors, written out."""
    norms = []
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            norms.append(torch.sqrt(((parameter @ parameter.T - torch.eye(parameter.shape[0])) ** 2).sum()))
        elif ".lora_B." in name:
            norms.append(torch.sqrt(((parameter.T @ parameter - torch.eye(parameter.shape[1])) ** 2).sum()))
    return weight * torch.stack(norms).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_equal_peft(family: str) -> None:
    case = CASES[family]
    peft_model, model, handle = peft_twin(case)
    batch = case.inputs(1)
    with torch.no_grad():
        base = forward(model, batch)
    theirs = forward(peft_model, batch)
    theirs.loss.backward()
    with handle:
        ours = forward(model, batch)
        ours.loss.backward()
        term = hand_orthogonal_term(model, case.fields.get("orth_reg_weight", 0.5))
        task_loss = model(**batch, return_dict=False)[0]  # a tuple: returned as it is, without the term (as PEFT)
        with handle.disabled():
            disabled = forward(model, batch).loss
    assert (theirs.logits - base.logits).abs().max() > MIN_EFFECT
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    assert term > MIN_EFFECT
    torch.testing.assert_close(ours.loss, task_loss + term, atol=ATOL, rtol=0)  # loss = task loss + the term
    torch.testing.assert_close(disabled, base.loss, atol=0, rtol=0)  # disabled(): the base loss, no term
    expected = adapter_parameters(peft_model)
    for name, parameter in handle.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(parameter.grad, expected[name].grad, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_and_trainable_parameters_equal_peft(family: str) -> None:
    case = CASES[family]
    peft_model, model, handle = peft_twin(case)
    with handle:
        keys = list(model.state_dict())
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        counts = handle.get_nb_trainable_parameters()
    assert keys == [key.removeprefix(PEFT_PREFIX) for key in peft_model.state_dict()]  # ranknum included, in place
    assert trainable == {n.removeprefix(PEFT_PREFIX) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert counts == peft_model.get_nb_trainable_parameters()
    assert not any(".ranknum." in name for name, _ in handle.named_parameters())  # a constant, as in PEFT


def test_initial_values_equal_peft_for_the_same_seed() -> None:
    """The factors are drawn in PEFT's order: after the same seeded model, PEFT's values (both initialisations)."""
    case = CASES["llama"]
    for init in (True, False):
        peft_model = peft.get_peft_model(build_model("llama"), peft_config(case, init_lora_weights=init))
        model = build_model("llama")  # seeds the RNG and draws the model's weights, as on PEFT's side
        handle = attach_adalora(model, AdaLoraConfig(**case.fields, init_lora_weights=init))
        theirs = adapter_parameters(peft_model)
        for name, parameter in handle.named_parameters():
            assert torch.equal(parameter, theirs[name]), name


def test_bf16_logits_and_loss_equal_peft_within_bf16_rounding() -> None:
    """A bf16 model: PEFT keeps float32 adapters (``autocast_adapter_dtype``), as ours are."""
    llama = CASES["llama"]

    def build() -> Any:
        return nn.Module.to(llama.build(), torch.bfloat16)

    case = Case(build, llama.inputs, llama.fields)
    peft_model, model, handle = peft_twin(case)
    assert {p.dtype for p in handle.parameters()} == {torch.float32}
    batch = case.inputs(2)
    with torch.no_grad():
        theirs = forward(peft_model, batch)
        with handle:
            ours = forward(model, batch)
    assert ours.logits.dtype == torch.bfloat16
    torch.testing.assert_close(ours.logits, theirs.logits, atol=0, rtol=0)  # the same ops, the same roundings
    torch.testing.assert_close(ours.loss, theirs.loss, atol=0, rtol=0)


def test_merged_logits_equal_unmerged_and_peft_merge() -> None:
    case = CASES["gpt2"]
    peft_model, model, handle = peft_twin(case)
    batch = case.inputs(3)
    with torch.no_grad(), handle:
        unmerged = forward(model, batch).logits
        handle.merge()
        merged = forward(model, batch).logits
        peft_model.base_model.merge_adapter()
        theirs = forward(peft_model, batch).logits
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged, theirs, atol=ATOL, rtol=0)


def test_each_row_alone_equals_its_adapter_in_a_mixed_batch() -> None:
    """Per-row ``adapter_names`` (PEFT's AdaLoRA has no such path): a row equals the same row run alone."""
    case = CASES["llama"]
    model = case.build()
    first = attach_adalora(model, AdaLoraConfig(**case.fields, init_lora_weights=False), "first")
    second = attach_adalora(model, AdaLoraConfig(**case.fields, init_lora_weights=False, inference_mode=True), "second")
    batch = random_batch(3, 6, seed=4, left_pad=[0, 2, 1])
    with torch.no_grad(), first, second:
        mixed = model(**batch, adapter_names=["second", "__base__", "first"]).logits
        with adapter_rows(model, ["second", "__base__", "first"]):
            mixed_context = model(**batch).logits
        alone = []
        for row, only in enumerate(["second", None, "first"]):
            row_batch = {key: value[row : row + 1] for key, value in batch.items()}
            others = [handle for handle in (first, second) if handle.adapter_name != only]
            with _all_disabled(others):
                alone.append(model(**row_batch).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed_context, mixed, atol=0, rtol=0)
    assert not torch.allclose(alone[0], alone[2], atol=MIN_EFFECT)


def _all_disabled(handles: list[Any]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for handle in handles:
        stack.enter_context(handle.disabled())
    return stack


def test_peft_state_dict_loads_by_name() -> None:
    """PEFT's adapter state dict (``get_peft_model_state_dict``: no ``.weight``, no ranknum) fits our factor names."""
    case = CASES["llama"]
    peft_model, model, handle = peft_twin(case)
    saved = peft.get_peft_model_state_dict(peft_model)
    renamed = {f"{key.removeprefix(PEFT_PREFIX)}.default": value for key, value in saved.items()}
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.zero_()
    copy_parameters(renamed, handle)
    batch = case.inputs(5)
    with torch.no_grad(), handle:
        torch.testing.assert_close(model(**batch).logits, peft_model(**batch).logits, atol=ATOL, rtol=0)
