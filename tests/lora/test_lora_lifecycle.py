"""LoRA's attach/detach lifecycle: no trace after detach (original module objects back, same
tensors, flags restored), atomic attach, the handle API, and prefix + LoRA on one model.

The no-trace check is the foundation's (``tests/core/test_lifecycle.py``: ``snapshot`` /
``assert_untouched``, over hypothesis programs of attach/detach/forward/backward/disabled
blocks with errors and interrupts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from restoration import (
    ERRORS_EVERYWHERE,
    MANUAL_ACROSS_INTERRUPT,
    NESTED_REATTACH,
    PROGRAMS,
    ProgramRun,
    assert_untouched,
    detach_everything,
    make_warm_model,
    snapshot,
)
from tiny_encoders import attach_random_prefix
from tiny_lora import randomise, run
from tiny_models import random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import attachments_of
from prefix_hooks.lora import LoraConfig, ModulesToSaveWrapper, attach_lora
from prefix_hooks.lora import attachment as lora_attachment
from prefix_hooks.lora.layers import LoraLayer

__all__ = ["make_warm_model"]  # the fixture, imported for pytest

ATOL = 1e-5
TARGETS = {  # family -> targets covering every supported layer type the family has
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_fc", "wte"],
}
SAVED = {"llama": ["lm_head"], "gpt2": ["ln_f"]}


def lora_config(family: str, **overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = {"r": 2, "lora_alpha": 4, "target_modules": TARGETS[family], **overrides}
    return LoraConfig(**fields)


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


# --- 1. no trace --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(TARGETS))
@given(
    program=PROGRAMS,
    attn=st.sampled_from(["eager", "sdpa"]),
    frozen_mask=st.integers(0, 255),
    save=st.booleans(),
)
@example(program=NESTED_REATTACH, attn="sdpa", frozen_mask=0b1010, save=True)
@example(program=MANUAL_ACROSS_INTERRUPT, attn="eager", frozen_mask=0b0001, save=False)
@example(program=ERRORS_EVERYWHERE, attn="sdpa", frozen_mask=0b1111_1110, save=True)
def test_detach_leaves_no_trace(
    make_warm_model: Callable[..., PreTrainedModel], family: str, program: list[Any], attn: str,
    frozen_mask: int, save: bool,
) -> None:
    """(Trainable biases would keep the ``.grad`` a backward gave them, as in any training, so
    ``bias`` modes are checked without backward below.)"""
    model = make_warm_model(family, attn, frozen_mask=frozen_mask)
    before = snapshot(model)
    handle = attach_lora(model, lora_config(family, modules_to_save=SAVED[family] if save else None))
    randomise(handle)
    assert_untouched(model, before)  # building the handle changes nothing
    try:
        program_run = ProgramRun(model, handle, before)
        program_run.run(program)
        program_run.finish()
    finally:
        detach_everything(model)


@pytest.mark.parametrize("merge", [False, True])
def test_original_modules_come_back_with_the_same_tensors(
    make_warm_model: Callable[..., PreTrainedModel], merge: bool
) -> None:
    model = make_warm_model("gpt2")
    modules = dict(model.named_modules())
    tensors = {name: (id(p), p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    handle = attach_lora(model, lora_config("gpt2", bias="all", modules_to_save=["ln_f"]))
    randomise(handle)
    batch = random_batch(2, 5)
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.1)  # base parameters included
    with handle:
        wrapped = [name for name, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
        assert wrapped == [*handle.target_names, *handle.modules_to_save_names]
        for name in wrapped:
            replacement = model.get_submodule(name)
            inner = replacement.base_layer if isinstance(replacement, LoraLayer) else replacement.original_module
            assert inner is modules[name]  # the very module, wrapped, not copied
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()  # frozen tensors have no grad: only adapters and biases move
        if merge:
            handle.merge()
    assert dict(model.named_modules()) == modules
    for name, p in model.named_parameters():
        identity, pointer, value = tensors[name]
        assert (id(p), p.data_ptr()) == (identity, pointer)
        if not name.endswith(".bias"):
            assert torch.equal(p, value), name
    assert any(not torch.equal(p, tensors[name][2]) for name, p in model.named_parameters() if name.endswith(".bias"))


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_adapters_leave_in_either_order_and_restore_flags(
    make_warm_model: Callable[..., PreTrainedModel], first: str
) -> None:
    model = make_warm_model("gpt2", frozen_mask=0b0101)
    before = snapshot(model)
    a = attach_lora(model, lora_config("gpt2", bias="all", modules_to_save=["ln_f"]), "a")
    b = attach_lora(model, LoraConfig(r=3, target_modules=["c_attn", "c_proj"], bias="lora_only"), "b")
    with a:
        flags_a = trainable_ids(model)
    with b:
        flags_b = trainable_ids(model)
    a.attach()
    b.attach()
    assert trainable_ids(model) == flags_a | flags_b
    leaving, staying, staying_flags = (a, b, flags_b) if first == "a" else (b, a, flags_a)
    leaving.detach()
    assert trainable_ids(model) == staying_flags
    staying.detach()
    assert_untouched(model, before)


# --- 2. atomic attach --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"target_modules": ["no_such_module"]}, ValueError, r"target_modules=\['no_such_module'\].*matches no module"),
        ({"target_modules": r"model\.layers\.9\..*"}, ValueError, "matches no module"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ValueError, "matches no module"),
        ({"target_modules": ["mlp"]}, ValueError, r"'model\.layers\.0\.mlp' \(LlamaMLP\), which LoRA cannot wrap"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["no_head"]}, ValueError, r"\['no_head'\] match no module"),
    ],
)
def test_bad_targets_are_refused_before_touching_the_model(
    make_warm_model: Callable[..., PreTrainedModel], fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=message):
        attach_lora(model, LoraConfig(**fields))
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "r=0"),
        ({"r": -2}, "r=-2"),
        ({"target_modules": "(q_proj"}, r"target_modules='\(q_proj' is not a valid regular expression"),
        ({"exclude_modules": "[x"}, "not a valid regular expression"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ],
)
def test_bad_config_values_raise_clear_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)


def test_config_of_the_wrong_type_is_refused(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    import peft

    model = make_warm_model("llama")
    with pytest.raises(TypeError, match="prefix_hooks.LoraConfig"):
        attach_lora(model, peft.LoraConfig(target_modules=["q_proj"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("failing_call", [1, 3, 5])
def test_failure_midway_through_install_leaves_the_model_untouched(
    make_warm_model: Callable[..., PreTrainedModel], monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    model = make_warm_model("llama")
    other = attach_lora(model, LoraConfig(r=2, target_modules=["v_proj"]), "other").attach()  # shares v_proj
    before = snapshot(model)
    handle = attach_lora(model, lora_config("llama", modules_to_save=["lm_head"]))
    lend = lora_attachment._lend
    calls = 0

    def failing_lend(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise RuntimeError("injected failure")
        lend(*args)

    monkeypatch.setattr(lora_attachment, "_lend", failing_lend)
    with pytest.raises(RuntimeError, match="injected failure"):
        handle.attach()
    monkeypatch.undo()
    assert not handle.is_attached
    assert_untouched(model, before)
    with handle:
        assert attachments_of(model) == [other, handle]
    assert_untouched(model, before)
    other.detach()


def test_a_changed_model_is_refused(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    handle = attach_lora(model, lora_config("llama"))
    attention = model.model.layers[0].self_attn
    original = attention.q_proj
    attention.q_proj = nn.Linear(original.in_features, original.out_features, bias=False)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'model\.layers\.0\.self_attn\.q_proj' is no longer the module"):
        handle.attach()
    assert_untouched(model, before)


def test_target_inside_another_adapters_module_to_save_is_refused(
    make_warm_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_warm_model("llama")
    saving = attach_lora(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "saving")
    wrapping = attach_lora(model, LoraConfig(target_modules=["lm_head"]), "wrapping")
    with saving:
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="'lm_head' is a module to save of adapters \\['saving'\\]"):
            wrapping.attach()
        assert_untouched(model, before)


# --- 3. the handle -----------------------------------------------------------------------------
def test_handle_forms_and_trained_weights_survive_reattach(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    batch = random_batch(2, 5)
    base = run(model, batch)
    handle = attach_lora(model, lora_config("llama"))
    randomise(handle)
    assert handle.num_trainable_parameters() == sum(p.numel() for p in handle.parameters()) > 0
    optimizer = torch.optim.SGD(handle.parameters(), lr=0.5)  # built before attach

    @handle
    def train_step() -> torch.Tensor:
        output = model(**batch, labels=batch["input_ids"])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return output.logits.detach()

    @handle
    def tokens() -> Iterator[torch.Tensor]:
        yield run(model, batch)
        yield run(model, batch)

    first = train_step()
    assert_untouched(model, before)
    with handle:
        after_step = run(model, batch)
        with handle:  # nested: counts
            assert handle.is_attached
        assert handle.is_attached
    assert not torch.equal(after_step, first)  # the step changed the adapter, and the handle kept it
    assert all(torch.equal(t, after_step) for t in tokens())
    assert_untouched(model, before)
    assert torch.equal(run(model, batch), base)
    handle.set_trainable(False)
    assert handle.num_trainable_parameters() == 0


def test_inference_mode_builds_frozen_adapters(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    with attach_lora(model, lora_config("llama", inference_mode=True, modules_to_save=["lm_head"])) as handle:
        assert handle.num_trainable_parameters() == 0
        assert not trainable(model)


def test_disabled_gives_the_base_logits_and_the_original_modules_to_save(
    make_warm_model: Callable[..., PreTrainedModel],
) -> None:
    model = make_warm_model("gpt2")
    batch = random_batch(2, 5, left_pad=[0, 1])
    base = run(model, batch)
    handle = attach_lora(model, lora_config("gpt2", modules_to_save=["ln_f"]))
    randomise(handle)
    with handle.disabled(), handle:  # disabled before attaching: stays disabled once attached
        assert torch.equal(run(model, batch), base)
    with handle:
        adapted = run(model, batch)
        with handle.disabled():
            assert not handle.is_enabled
            assert torch.equal(run(model, batch), base)
        assert torch.equal(run(model, batch), adapted)
    assert not torch.equal(adapted, base)


# --- 4. prefix + LoRA -------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_first", [True, False])
def test_prefix_and_lora_together(make_warm_model: Callable[..., PreTrainedModel], prefix_first: bool) -> None:
    model = make_warm_model("llama")
    batch = random_batch(2, 5, left_pad=[0, 2])
    before = snapshot(model)
    prefix = attach_random_prefix(model, 3)
    lora = attach_lora(model, lora_config("llama"))
    randomise(lora)
    with prefix:
        only_prefix = run(model, batch)
    with lora:
        only_lora = run(model, batch)
    outer, inner = (prefix, lora) if prefix_first else (lora, prefix)
    with outer, inner:
        both = run(model, batch)
        adapter_ids = {id(p) for p in [*prefix.parameters(), *lora.parameters()]}
        assert {id(p) for p in model.parameters() if p.requires_grad} == adapter_ids
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*prefix.parameters(), *lora.parameters()])
        with lora.disabled():
            torch.testing.assert_close(run(model, batch), only_prefix, atol=ATOL, rtol=0)
        with prefix.disabled():
            torch.testing.assert_close(run(model, batch), only_lora, atol=ATOL, rtol=0)
        with pytest.raises(RuntimeError, match="reverse order"):
            outer.detach()
    assert not torch.equal(both, only_prefix) and not torch.equal(both, only_lora)
    for p in [*prefix.parameters(), *lora.parameters()]:
        p.grad = None
    assert_untouched(model, before)


def test_lora_attached_before_a_prefix_waits_for_it(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    first = attach_lora(model, lora_config("llama"), "first").attach()
    prefix = attach_random_prefix(model, 3).attach()
    second = attach_lora(model, LoraConfig(target_modules=["k_proj"]), "second").attach()
    with pytest.raises(RuntimeError, match="detach 'default' first"):
        first.detach()  # the prefix was attached after it
    second.detach()
    prefix.detach()
    first.detach()
    assert_untouched(model, before)
