"""AdaLoRA's lifecycle: no trace after detach (merged or not, float32 and bf16), the orthogonal term's
shadow and when it applies, atomic refusals (a second trainable adapter, LoRA and AdaLoRA on one
module, unsupported targets), and ``attach()`` / ``attach_lora`` with an ``AdaLoraConfig``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import peft
import pytest
import restoration
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from restoration import make_warm_model
from tiny_adalora import CASES, adapter_parameters, peft_twin
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import (
    AdaLoraAttachment,
    AdaLoraConfig,
    LoraConfig,
    attach,
    attach_adalora,
    attach_lora,
    set_active_adapters,
)
from prefix_hooks.lora.adalora import orthogonal_penalty

__all__ = ["make_warm_model"]  # the fixture, imported for pytest

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def config(family: str, **overrides: Any) -> AdaLoraConfig:
    fields: dict[str, Any] = {
        "init_r": 3,
        "target_r": 1,
        "total_step": 10,
        "target_modules": TARGETS[family],
        "init_lora_weights": False,
        **overrides,
    }
    return AdaLoraConfig(**fields)


def labelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "labels": batch["input_ids"]}


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- no trace -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(TARGETS))
@given(program=restoration.PROGRAMS, attn=st.sampled_from(["eager", "sdpa"]), frozen_mask=st.integers(0, 255))
@example(program=restoration.NESTED_REATTACH, attn="sdpa", frozen_mask=0b1010)
@example(program=restoration.ERRORS_EVERYWHERE, attn="eager", frozen_mask=0b1111_1110)
def test_detach_leaves_no_trace(
    make_warm_model: Callable[..., PreTrainedModel], family: str, program: list[Any], attn: str, frozen_mask: int
) -> None:
    model = make_warm_model(family, attn, frozen_mask=frozen_mask)
    before = restoration.snapshot(model)
    handle = attach_adalora(model, config(family))  # random factors: the adapter changes the logits
    restoration.assert_untouched(model, before)  # building the handle changes nothing
    checked = restoration.ProgramRun(
        model, handle, before
    )  # each step's logits, attachment state and, detached, the snapshot
    try:
        checked.run(program)
        checked.finish()  # detaches what the program left attached, then compares with the snapshot
    finally:
        restoration.detach_everything(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("family", list(TARGETS))
def test_detach_after_training_and_merge_restores_bit_exactly(
    make_warm_model: Callable[..., PreTrainedModel], family: str, dtype: torch.dtype
) -> None:
    model = make_warm_model(family)
    nn.Module.to(model, dtype)  # transformers' decorated .to() confuses mypy
    before, digest = restoration.snapshot(model), state_hash(model)
    handle = attach_adalora(model, config(family))
    batch = labelled(random_batch(2, 5, seed=2))
    with handle:
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
        model.train()
        for step in range(3):
            model(**batch).loss.backward()
            optimizer.step()
            handle.update_and_allocate(step)
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            unmerged = model(**batch).logits
            handle.merge()
            merged = model(**batch).logits
            assert "forward" in vars(model)  # the orthogonal term's shadow
    torch.testing.assert_close(merged, unmerged, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0)
    restoration.assert_untouched(model, before)
    assert state_hash(model) == digest
    assert "forward" not in vars(model)


def test_bake_folds_the_adapter_as_peft_merge_and_unload() -> None:
    case = CASES["gpt2"]
    peft_model, model, handle = peft_twin(case)
    modules = dict(model.named_modules())
    handle.bake()  # attaches, folds, detaches
    merged = peft_model.merge_and_unload()
    assert dict(model.named_modules()) == modules and "forward" not in vars(model)
    expected = merged.state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(tensor, case.build().state_dict()[key]) for key, tensor in model.state_dict().items())


# --- the orthogonal term: where and when --------------------------------------------------------
def test_the_term_reaches_every_call_path_and_only_a_running_trainable_adapter_adds_it() -> None:
    model = build_model("llama")
    batch = labelled(random_batch(2, 5, seed=3))
    handle = attach_adalora(model, config("llama"))
    frozen = attach_adalora(model, config("llama", inference_mode=True, target_modules=["k_proj"]), "frozen")
    factors = dict(handle.named_parameters())
    pairs = [(factors[f"{t}.lora_A.default"], factors[f"{t}.lora_B.default"]) for t in handle.target_names]
    term = handle.config.orth_reg_weight * orthogonal_penalty(pairs)

    def loss_and_task_loss() -> tuple[torch.Tensor, torch.Tensor]:
        return model(**batch).loss, model(**batch, return_dict=False)[0]  # a tuple output: left as it is

    with torch.no_grad(), handle, frozen:
        loss, task_loss = loss_and_task_loss()
        direct = model.forward(**batch).loss
        with handle.disabled():  # the frozen adapter still runs and adds no term of its own
            disabled_loss, disabled_task_loss = loss_and_task_loss()
        set_active_adapters(model, ["frozen"])
        inactive_loss, inactive_task_loss = loss_and_task_loss()
    assert isinstance(term, torch.Tensor) and term > 1e-3
    torch.testing.assert_close(loss, task_loss + term, atol=1e-5, rtol=0)
    torch.testing.assert_close(direct, loss, atol=0, rtol=0)
    torch.testing.assert_close(disabled_loss, disabled_task_loss, atol=0, rtol=0)
    torch.testing.assert_close(inactive_loss, inactive_task_loss, atol=0, rtol=0)
    assert not torch.equal(disabled_task_loss, task_loss)  # the adapters change the output


def test_only_one_trainable_adalora_adapter_per_model() -> None:
    model = build_model("llama")
    first = attach_adalora(model, config("llama")).attach()
    before = restoration.snapshot(model)
    second = attach_adalora(model, config("llama", target_modules=["k_proj"]), "second")
    with pytest.raises(ValueError, match=r"'default' is attached and trainable; a model supports only 1 trainable"):
        second.attach()
    restoration.assert_untouched(model, before)
    first.detach()


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-then-adalora", "adalora-then-lora"])
def test_lora_and_adalora_cannot_share_a_module(lora_first: bool) -> None:
    model = build_model("llama")
    lora = attach_lora(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), "lora")
    adalora = attach_adalora(model, config("llama", target_modules=["q_proj"]))
    first, second = (lora, adalora) if lora_first else (adalora, lora)
    first.attach()
    before = restoration.snapshot(model)
    error: tuple[type[Exception], str] = (RuntimeError, r"holds LoRA adapters \['lora'\]; an AdaLoRA adapter cannot")
    if not lora_first:
        error = (TypeError, r"LoRA and AdaLoRA adapters cannot share a target module")
    with pytest.raises(error[0], match=error[1]):
        second.attach()
    restoration.assert_untouched(model, before)
    first.detach()
    with attach_adalora(model, config("llama", target_modules=["v_proj"])), lora:  # different modules: fine
        model(**random_batch(1, 4))


def test_unsupported_targets_and_configs_are_refused_before_touching_the_model(
    make_warm_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_warm_model("llama")
    before = restoration.snapshot(model)
    with pytest.raises(TypeError, match=r"AdaLoRA cannot adapt a torch.nn.modules.sparse.Embedding"):
        attach_adalora(model, config("llama", target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(TypeError, match=r"an AdaLoraConfig builds an AdaLoRA adapter: use attach_adalora"):
        attach_lora(model, config("llama"))
    with pytest.raises(TypeError, match=r"config must be a prefix_hooks.AdaLoraConfig"):
        attach_adalora(model, LoraConfig(target_modules=["q_proj"]))  # type: ignore[arg-type]
    restoration.assert_untouched(model, before)
    group = attach(model, config("llama"))
    assert [type(part) for part in group.parts] == [AdaLoraAttachment]
    restoration.assert_untouched(model, before)


def test_default_targets_are_peft_adalora_defaults() -> None:
    """``target_modules=None``: PEFT's AdaLoRA table (OPT: every projection, unlike LoRA's q/v)."""
    for family in ("llama", "opt"):
        model = build_model(family)
        theirs = peft.get_peft_model(build_model(family), peft.AdaLoraConfig(total_step=10))
        names = {re.sub(r"\.lora_[ABE]\.default$", "", name) for name in adapter_parameters(theirs)}
        handle = attach_adalora(model, AdaLoraConfig(total_step=10))
        assert handle.target_names == sorted(names, key=list(dict(model.named_modules())).index)
        assert handle.config.target_modules is not None
