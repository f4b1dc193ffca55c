"""``modules_to_save`` and PEFT's implicit task heads for prefix tuning and prompt methods.

Oracle: PEFT's task model on the same weights trains the classification head as a full copy
next to a prefix or a prompt; a few AdamW steps on both sides must give the same losses and
the same trained head. Detach must put the original head object back, untouched. (PEFT runs
through ``bridge_peft_cache_keyword``: on transformers 5.24+ it refuses a prefix on this head
only because it looks for the cache argument as ``past_key_values``.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot
from shared_fixtures import bridge_peft_cache_keyword
from tiny_encoders import build_head, text_batch
from torch import nn

from prefix_hooks import (
    Attachment,
    PrefixAttachment,
    PrefixTuningConfig,
    PromptAttachment,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper

P = 3
STEPS = 3


def _ours_prefix(model: nn.Module, **fields: Any) -> Attachment:
    return attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, **fields))


def _ours_prompt(model: nn.Module, **fields: Any) -> Attachment:
    return attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P, **fields))


def _ours_ptuning(model: nn.Module, **fields: Any) -> Attachment:
    return attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=P, **fields))


METHODS: dict[str, tuple[Callable[..., Attachment], Callable[[], Any]]] = {
    "prefix": (_ours_prefix, lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)),
    "prompt": (_ours_prompt, lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)),
    "p-tuning": (_ours_ptuning, lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P)),
}


def _encoder_of(handle: Attachment) -> nn.Module:
    if isinstance(handle, PrefixAttachment):
        return handle.encoder
    assert isinstance(handle, PromptAttachment)
    return handle.prompt_encoder


def _randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def _train(model: nn.Module, parameters: list[nn.Parameter], batch: dict[str, torch.Tensor]) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=0.05)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", list(METHODS))
def test_the_task_head_trains_as_peft_trains_it(method: str) -> None:
    ours_factory, peft_config = METHODS[method]
    model: Any = build_head("bert", "sequence")
    peft_base = copy.deepcopy(model)
    batch = {**text_batch("bert", batch=4, seed=1, right_pad=[0, 2, 1, 0]), "labels": torch.tensor([0, 1, 1, 0])}
    head = model.classifier
    head_before = {key: value.clone() for key, value in head.state_dict().items()}
    with torch.no_grad():
        model(**batch)  # bert's head writes config.problem_type on its first forward with labels
    before = snapshot(model)

    handle = ours_factory(model, task_type="SEQ_CLS")
    _randomise(_encoder_of(handle), seed=2)
    assert isinstance(handle.saved_modules, object) and handle.saved_modules.names == ["classifier"]  # type: ignore[attr-defined]
    peft_model = bridge_peft_cache_keyword(peft.get_peft_model(peft_base, peft_config()))
    peft_model.prompt_encoder["default"].load_state_dict(_encoder_of(handle).state_dict())

    model.train()
    peft_model.train()
    with handle:
        assert isinstance(model.classifier, ModulesToSaveWrapper)
        ours = _train(model, list(handle.parameters()), batch)
        trained_head = {key: value.clone() for key, value in model.classifier.state_dict().items()}
    theirs = _train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], batch)
    model.eval()

    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    assert ours[-1] < ours[0]
    peft_head = peft_model.base_model.classifier.modules_to_save["default"].state_dict()
    for key in ("weight", "bias"):
        torch.testing.assert_close(trained_head[f"modules_to_save.default.{key}"], peft_head[key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(trained_head[f"modules_to_save.default.{key}"], head_before[key])

    # detached: the very same head object, untouched; attached again: the trained copy is back
    assert model.classifier is head and all(torch.equal(head.state_dict()[k], v) for k, v in head_before.items())
    assert_untouched(model, before)
    eval_batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), handle:
        again = model(**eval_batch).logits
        with handle.disabled():
            base = model(**eval_batch).logits
    with torch.no_grad():
        torch.testing.assert_close(base, model(**eval_batch).logits)  # disabled: base head and no prefix
    assert (again - base).abs().max() > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_modules_to_save_by_name_and_errors(method: str) -> None:
    ours_factory, _ = METHODS[method]
    model = build_head("bert", "sequence")
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entries \\['missing_head'\\] match no module"):
        ours_factory(model, modules_to_save=["missing_head"])
    assert_untouched(model, before)
    handle = ours_factory(model, modules_to_save=["pooler.dense"])
    assert handle.saved_modules.names == ["bert.pooler.dense"]  # type: ignore[attr-defined]
    trainable_names = {name for name, _ in handle.named_parameters()}
    with handle:
        assert isinstance(model.get_submodule("bert.pooler.dense"), ModulesToSaveWrapper)
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        assert "classifier.weight" in frozen  # no task_type: the head stays frozen, as in PEFT's base class
    assert any(name.startswith("weight") or name.endswith("weight") for name in trainable_names)
    assert_untouched(model, before)


def test_no_task_type_no_copies() -> None:
    model = build_head("bert", "sequence")
    for factory, _ in METHODS.values():
        assert factory(model).saved_modules.names == []  # type: ignore[attr-defined]
