"""Parity with PEFT's LoRA on identical weights (PEFT is the oracle).

The same tiny model is built twice with the same seed; one copy is wrapped by
``peft.get_peft_model``, the other gets ``attach_lora``. Both adapters must have the same
parameter names and shapes (so PEFT state dicts load 1:1); PEFT's factors (and
modules-to-save copies) get random values, are copied into ours by name, and the logits
must agree to fp32 round-off. The attached model's ``state_dict()`` keys equal PEFT's
without its ``base_model.model.`` prefix, and the trainable parameters are the same.
"""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from tiny_lora import CASES, NOISE, Case, is_adapter_key, run
from torch import nn

from prefix_hooks.lora import LoraAttachment, LoraConfig, attach_lora

ATOL = 1e-5
MIN_EFFECT = 1e-3  # the adapter must move the logits by more than this, or parity proves nothing
ADAPTER_SEED = 5
PEFT_PREFIX = "base_model.model."


def peft_pair(case: Case) -> tuple[peft.PeftModel, nn.Module, LoraAttachment]:
    """(PEFT model, our model, our unattached handle) with equal random adapter weights."""
    fields = copy.deepcopy(case.fields)  # PEFT extends modules_to_save in place
    peft_model = peft.get_peft_model(case.build(), peft.LoraConfig(**fields, **case.peft_only)).eval()
    ours = case.build()
    handle = attach_lora(ours, LoraConfig(**case.fields))
    theirs = {name.removeprefix(PEFT_PREFIX): p for name, p in peft_model.named_parameters() if is_adapter_key(name)}
    mine = dict(handle.named_parameters())
    assert sorted(mine) == sorted(theirs)
    generator = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name in sorted(theirs):
            value = theirs[name] + NOISE * torch.randn(theirs[name].shape, generator=generator)
            theirs[name].copy_(value)
            mine[name].copy_(value)
    return peft_model, ours, handle


@pytest.mark.parametrize("case_id", list(CASES))
def test_logits_equal_peft_on_identical_weights(case_id: str) -> None:
    case = CASES[case_id]
    peft_model, ours, handle = peft_pair(case)
    inputs = case.inputs()
    base = run(ours, inputs)
    expected = run(peft_model, inputs)
    with handle:
        got = run(ours, inputs)
        keys = list(ours.state_dict())
    assert (expected - base).abs().max() > MIN_EFFECT
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert keys == [key.removeprefix(PEFT_PREFIX) for key in peft_model.state_dict()]
    torch.testing.assert_close(run(ours, inputs), base, atol=0, rtol=0)  # detached: the base model again


def trainable_names(model: nn.Module, prefix: str = "") -> set[str]:
    return {name.removeprefix(prefix) for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("case_id", ["gpt2-conv1d", "bert-seq-cls"])
def test_trainable_parameters_equal_peft(case_id: str, bias: str) -> None:
    case = CASES[case_id]
    case = Case(case.build, case.inputs, {**case.fields, "bias": bias}, case.peft_only)
    peft_model, ours, handle = peft_pair(case)
    before = trainable_names(ours)
    with handle:
        attached = trainable_names(ours)
        counts = handle.get_nb_trainable_parameters()
    expected = trainable_names(peft_model, PEFT_PREFIX)
    assert attached == expected
    assert any(name.endswith(".bias") and ".modules_to_save." not in name for name in attached) == (bias != "none")
    assert counts == peft_model.get_nb_trainable_parameters()
    assert trainable_names(ours) == before


def test_print_trainable_parameters_matches_peft(capsys: pytest.CaptureFixture[str]) -> None:
    peft_model, _, handle = peft_pair(CASES["bert-seq-cls"])
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    with handle:
        handle.print_trainable_parameters()
    assert capsys.readouterr().out == expected


def peft_key_to_ours(key: str, adapter: str = "default") -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora_A.<adapter>.weight`` (embeddings: no ``.weight``)."""
    name = re.sub(r"\.(lora_A|lora_B)\.weight$", rf".\1.{adapter}.weight", key.removeprefix(PEFT_PREFIX))
    return re.sub(r"\.(lora_embedding_A|lora_embedding_B)$", rf".\1.{adapter}", name)


def test_peft_state_dict_loads_by_name() -> None:
    """PEFT's adapter state dict (``get_peft_model_state_dict``) loads into ours by key."""
    case = CASES["llama-embedding"]
    peft_model = peft.get_peft_model(case.build(), peft.LoraConfig(**case.fields, init_lora_weights=False)).eval()
    saved = peft.get_peft_model_state_dict(peft_model)  # keys without the adapter name
    ours = case.build()
    handle = attach_lora(ours, LoraConfig(**case.fields))
    mine = dict(handle.named_parameters())
    renamed = {peft_key_to_ours(key): value for key, value in saved.items() if ".lora_" in key}
    assert sorted(renamed) == sorted(mine)
    with torch.no_grad():
        for name, value in renamed.items():
            mine[name].copy_(value)
    inputs = case.inputs()
    with handle:
        torch.testing.assert_close(run(ours, inputs), run(peft_model, inputs), atol=ATOL, rtol=0)
