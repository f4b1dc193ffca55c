"""Tiny models, inputs and AdaLoRA configs shared by the AdaLoRA tests, and PEFT twins of them.

Each case names a family (``llama``, ``gpt2``, ``bert``) so the feature table reads which families a
parity test covers. :func:`peft_twin` builds the same seeded model twice, wraps one with PEFT's
``get_peft_model`` and attaches ours (not yet attached) to the other, with PEFT's factors given random
non-zero values and copied into ours by name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import peft
import torch
from tiny_encoders import build as build_encoder
from tiny_encoders import example_inputs as encoder_inputs
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import AdaLoraAttachment, AdaLoraConfig, attach_adalora

PEFT_PREFIX = "base_model.model."
NOISE = 0.3
TOTAL_STEP = 30
INIT_R, TARGET_R = 6, 2


@dataclass
class Case:
    """A model, its labelled inputs and the AdaLoRA config fields (PEFT's names, used for both sides)."""

    build: Callable[[], PreTrainedModel]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    fields: dict[str, Any]


def _causal_inputs(seed: int) -> dict[str, torch.Tensor]:
    batch = random_batch(2, 6, seed=seed, left_pad=[0, 2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def _bert_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {**encoder_inputs("bert", seed=seed), "labels": torch.tensor([0, 2])}


SCHEDULE: dict[str, Any] = {"init_r": INIT_R, "target_r": TARGET_R, "total_step": TOTAL_STEP}

CASES: dict[str, Case] = {
    "llama": Case(
        lambda: build_model("llama"),
        _causal_inputs,
        {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM", "lora_alpha": 16},
    ),
    "gpt2": Case(
        lambda: build_model("gpt2"),
        _causal_inputs,
        {**SCHEDULE, "target_modules": ["c_attn", "c_proj", "c_fc"], "task_type": "CAUSAL_LM"},
    ),
    "bert": Case(
        lambda: build_encoder("bert"),
        _bert_inputs,
        {**SCHEDULE, "target_modules": ["query", "value", "dense"], "task_type": "SEQ_CLS", "lora_dropout": 0.1},
    ),
}
"""Family -> case: a causal LM (llama), GPT-2's Conv1D layers, BERT sequence classification (its
``classifier`` saved as a module to save, as PEFT does for ``SEQ_CLS``)."""


def peft_config(case: Case, **overrides: Any) -> peft.AdaLoraConfig:
    fields = {**copy.deepcopy(case.fields), **overrides}  # PEFT extends modules_to_save in place
    if case is CASES["gpt2"]:
        fields["fan_in_fan_out"] = True  # PEFT warns (an error here) unless told that Conv1D stores (in, out)
    return peft.AdaLoraConfig(**fields)


def adapter_parameters(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT's trainable adapter tensors by our in-model names (``ranknum`` left out, a constant)."""
    return {
        name.removeprefix(PEFT_PREFIX): parameter
        for name, parameter in peft_model.named_parameters()
        if (".lora_" in name or ".modules_to_save." in name)
    }


def copy_parameters(source: Mapping[str, torch.Tensor], handle: AdaLoraAttachment) -> None:
    """Copy ``source`` (by our names) into ``handle``'s parameters, which must have the same names."""
    mine = dict(handle.named_parameters())
    assert sorted(mine) == sorted(source)
    with torch.no_grad():
        for name, parameter in mine.items():
            parameter.copy_(source[name])


def peft_twin(case: Case, seed: int = 5, **overrides: Any) -> tuple[Any, PreTrainedModel, AdaLoraAttachment]:
    """(PEFT model, our model, our unattached handle) holding equal random adapter weights."""
    peft_model = peft.get_peft_model(case.build(), peft_config(case, **overrides)).eval()
    theirs = adapter_parameters(peft_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(theirs):
            theirs[name].add_(NOISE * torch.randn(theirs[name].shape, generator=generator))
    model = case.build()
    handle = attach_adalora(model, AdaLoraConfig(**{**case.fields, **overrides}))
    copy_parameters(theirs, handle)
    return peft_model, model, handle


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One training step up to (not including) the allocation: forward, backward, ``optimizer.step()``."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_twins(
    case: Case,
    peft_model: Any,
    model: nn.Module,
    handle: AdaLoraAttachment,
    steps: range,
    lr: float,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """SGD on both twins over ``steps`` (train mode; ``case.inputs(100 + step)``; the same dropout masks),
    ``update_and_allocate(step)`` on both after each ``optimizer.step()``; ``handle`` must be attached."""
    peft_model.train()
    model.train()
    peft_optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    optimizer = torch.optim.SGD(handle.parameters(), lr=lr)
    for step in steps:
        batch = case.inputs(100 + step)
        torch.manual_seed(step)
        sgd_step(peft_model, peft_optimizer, batch)
        peft_model.base_model.update_and_allocate(step)
        peft_optimizer.zero_grad()
        torch.manual_seed(step)
        sgd_step(model, optimizer, batch)
        handle.update_and_allocate(step)
        optimizer.zero_grad()
        if after_step is not None:
            after_step(step)
    peft_model.eval()
    model.eval()
