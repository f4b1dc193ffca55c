"""Copies of an attached model: ``copy.deepcopy``, ``AveragedModel``, a hand-made EMA, ``pickle`` and
``torch.save``.

The promise: a copy made inside the block carries a working adapter of its own (the copy's adapter
parameters, registered under the copy), listed by ``attachments_of(copy)`` and detachable on its
own; the original's detach leaves the copy adapted, the copy's detach leaves the original alone and
restores the copy to the base model. Oracles: the original's output inside the block (a copy must
equal it), and for averaged copies a fresh adapter attached to the original model with the
averages computed by hand from the trained weights.

Families: llama (the attention interposer), bloom (inline attention: per-module cache-view hooks),
t5 (per-module position-bias hooks) and bart (a position-shift hook on the decoder's positions),
so every kind of hook a prefix installs is copied.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import tiny_inline
import torch
from test_calling_paths import MIN_EFFECT, build, inputs_for, make_adapter
from torch import nn
from torch.optim.swa_utils import AveragedModel

from prefix_hooks import Attachment, LoraConfig, PrefixTuningConfig, attach, attach_prefix, attachments_of
from prefix_hooks.prefix import interposer as attention_interposer

ATOL = 1e-6
METHODS = ("prefix", "prompt", "p_tuning")
KINDS = ("llama", "bloom", "t5", "bart")
STEPS = 3
EMA_DECAY = 0.5
HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def build_kind(kind: str) -> Any:
    return tiny_inline.build(kind) if kind == "bloom" else build(kind)


def inputs_of(kind: str) -> dict[str, torch.Tensor]:
    return tiny_inline.example_inputs(kind, 2, 1) if kind == "bloom" else inputs_for(kind)


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def only_attachment(model: nn.Module) -> Attachment:
    attached = attachments_of(model)
    assert len(attached) == 1, attached
    return attached[0]


def traces(model: nn.Module) -> list[str]:
    """What an adapter could leave behind: instance forwards / save_pretrained, registered children
    named like ours, frozen parameters, hooks."""
    found = []
    for name, module in model.named_modules():
        found += [f"{name}.{key}" for key in ("forward", "save_pretrained", "accepts_loss_kwargs") if key in vars(module)]
        found += [f"{name}.{child}" for child in module._modules if child.endswith("_hooks_default")]
        found += [f"{name}.{hooks} ({len(getattr(module, hooks))})" for hooks in HOOK_DICTS if getattr(module, hooks)]
    found += [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    return found


# p-tuning differs from prompt tuning only in its prompt module: llama covers it
@pytest.mark.parametrize(
    ("kind", "method"), [(kind, method) for kind in KINDS for method in METHODS if kind == "llama" or method != "p_tuning"]
)
def test_a_copy_made_inside_the_block_carries_its_own_adapter(kind: str, method: str) -> None:
    model = build_kind(kind)
    inputs = inputs_of(kind)
    base = logits(model, inputs)
    assert traces(model) == []
    handle = make_adapter(method, model)
    with handle:
        adapted = logits(model, inputs)
        twin = copy.deepcopy(model)
        twin_handle = only_attachment(twin)
        assert type(twin_handle) is type(handle) and twin_handle is not handle
        assert twin_handle.model is twin and twin_handle.is_attached and attachments_of(model) == [handle]
        originals = {id(p) for p in model.parameters()}
        assert not any(id(p) in originals for p in twin.parameters()), "the copy shares a parameter"
        assert {id(p) for p in twin_handle.parameters()} <= {id(p) for p in twin.parameters()}
        torch.testing.assert_close(logits(twin, inputs), adapted, atol=ATOL, rtol=0)
        with handle.disabled():  # per attachment: the copy keeps its adapter
            assert torch.equal(logits(model, inputs), base)
            torch.testing.assert_close(logits(twin, inputs), adapted, atol=ATOL, rtol=0)
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():  # the copy's adapter is its own
            for parameter in twin_handle.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        changed = logits(twin, inputs)
        assert (changed - adapted).abs().max() > MIN_EFFECT
        assert torch.equal(logits(model, inputs), adapted)
    assert torch.equal(logits(model, inputs), base)
    assert torch.equal(logits(twin, inputs), changed), "the original's detach touched the copy"
    twin_handle.detach()
    assert attachments_of(twin) == []
    assert torch.equal(logits(twin, inputs), base)
    assert traces(twin) == [] and traces(model) == []
    assert not attention_interposer.is_installed()


@pytest.mark.parametrize("method", METHODS)
def test_the_copy_detaches_first_and_the_original_stays_adapted(method: str) -> None:
    model = build_kind("llama")
    inputs = inputs_of("llama")
    base = logits(model, inputs)
    with make_adapter(method, model):
        adapted = logits(model, inputs)
        twin = copy.deepcopy(model)
        only_attachment(twin).detach()
        assert torch.equal(logits(twin, inputs), base) and traces(twin) == []
        assert torch.equal(logits(model, inputs), adapted)
    assert torch.equal(logits(model, inputs), base) and traces(model) == []


def _train_step(model: nn.Module, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _oracle(model: nn.Module, method: str, values: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> Any:
    """The original model (detached) with a fresh adapter holding ``values``: its logits."""
    fresh = make_adapter(method, model)
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            parameter.copy_(values[name])
    with fresh:
        return logits(model, inputs)


Combine = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
"""``(value when copied, trained values after each step) -> the copy's expected value``."""


def _averaging(method: str, make_copy: Callable[[nn.Module], nn.Module],
               update: Callable[[nn.Module, nn.Module, Attachment, Attachment], None], combine: Combine) -> None:
    """Train ``STEPS`` steps inside the block, updating a copy after each: the copy's adapter must hold
    ``combine(...)`` of the trained values and compute what a fresh adapter with those values computes;
    the original's detach leaves it as it is."""
    model = build_kind("llama").train()
    inputs = inputs_of("llama")
    handle = make_adapter(method, model)
    history: dict[str, list[torch.Tensor]] = {}
    with handle:
        averaged = make_copy(model)
        inner = averaged.module if isinstance(averaged, AveragedModel) else averaged
        averaged_handle = only_attachment(inner)
        initial = {name: p.detach().clone() for name, p in averaged_handle.named_parameters()}
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.5)
        for _ in range(STEPS):
            _train_step(model, inputs, optimizer)
            update(averaged, model, averaged_handle, handle)
            for name, parameter in handle.named_parameters():
                history.setdefault(name, []).append(parameter.detach().clone())
        inner.eval()
        averaged_logits = logits(averaged, inputs)
    expected = {name: combine(initial[name], values) for name, values in history.items()}
    for name, parameter in averaged_handle.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], atol=1e-6, rtol=0, msg=name)
    model.eval()
    torch.testing.assert_close(averaged_logits, _oracle(model, method, expected, inputs), atol=1e-5, rtol=0)
    assert torch.equal(logits(averaged, inputs), averaged_logits), "the original's detach touched the copy"
    averaged_handle.detach()
    assert traces(inner) == []


@pytest.mark.parametrize("method", METHODS)
def test_averaged_model_made_inside_the_block_averages_the_adapter(method: str) -> None:
    """``torch.optim.swa_utils.AveragedModel`` deep-copies the model; ``update_parameters`` zips its
    parameters with the model's, adapter included: the copy holds the mean of the adapter's values."""

    def update(averaged: nn.Module, model: nn.Module, *_: Any) -> None:
        assert isinstance(averaged, AveragedModel)
        averaged.update_parameters(model)

    _averaging(method, AveragedModel, update, lambda _, values: torch.stack(values).mean(0))


@pytest.mark.parametrize("method", METHODS)
def test_a_hand_made_ema_copy_follows_the_adapter(method: str) -> None:
    def update(ema: nn.Module, model: nn.Module, ema_handle: Attachment, handle: Attachment) -> None:
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_handle.parameters(), handle.parameters(), strict=True):
                ema_parameter.mul_(EMA_DECAY).add_(parameter, alpha=1 - EMA_DECAY)

    def ema(initial: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        for trained in values:
            initial = EMA_DECAY * initial + (1 - EMA_DECAY) * trained
        return initial

    _averaging(method, copy.deepcopy, update, ema)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickling_an_attached_model_keeps_the_adapter_attached_to_the_unpickled_copy(how: str, method: str) -> None:
    model = build_kind("llama")
    inputs = inputs_of("llama")
    base = logits(model, inputs)
    with make_adapter(method, model):
        adapted = logits(model, inputs)
        if how == "pickle":
            loaded = pickle.loads(pickle.dumps(model))
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(logits(loaded, inputs), adapted, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(loaded, inputs), adapted, atol=ATOL, rtol=0)
    only_attachment(loaded).detach()
    assert torch.equal(logits(loaded, inputs), base) and traces(loaded) == []


def test_a_copy_dropped_without_detach_releases_the_interposer() -> None:
    model = build_kind("llama")
    with make_adapter("prefix", model):
        twin = copy.deepcopy(model)
    assert attention_interposer.is_installed()  # the copy's prefix still needs it
    del twin
    gc.collect()
    assert not attention_interposer.is_installed()


def test_copying_a_submodule_copies_the_model_it_belongs_to() -> None:
    """The prefix belongs to the whole model: a copy of ``model.model`` lives in a copy of the model,
    whose attachment serves it."""
    model = build_kind("llama")
    inputs = inputs_of("llama")
    memo: dict[int, Any] = {}
    with make_adapter("prefix", model), torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        inner = copy.deepcopy(model.model, memo)
        twin = memo[id(model)]
        assert twin.model is inner
        torch.testing.assert_close(inner(**inputs).last_hidden_state, hidden, atol=ATOL, rtol=0)
    only_attachment(twin).detach()
    assert traces(twin) == []


def test_prefix_and_lora_copy_with_the_prefix_attached_and_lora_layers_in_place() -> None:
    """LoRA (not copied as an attachment: its layers are plain modules of the copy) keeps working in the
    copy; the copy's prefix detaches on its own."""
    model = build_kind("llama")
    inputs = inputs_of("llama")
    with attach(model, PrefixTuningConfig(num_virtual_tokens=3), LoraConfig(r=4, init_lora_weights=False)):
        adapted = logits(model, inputs)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(logits(twin, inputs), adapted, atol=ATOL, rtol=0)
        assert [type(a).__name__ for a in attachments_of(twin)] == ["PrefixAttachment"]
    only_attachment(twin).detach()
    assert "save_pretrained" not in vars(twin) and "forward" not in vars(twin.model)


def test_an_attachment_whose_detach_would_act_on_the_original_refuses_to_be_copied() -> None:
    model = build_kind("llama")
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
    with handle:
        assert handle._undo is not None
        handle._undo.push(lambda: None)  # a bare function: a copy could not rebind it
        with pytest.raises(TypeError, match=r"cannot copy PrefixAttachment 'default'.*detach step"):
            copy.deepcopy(model)
        hook = model.model.layers[0].register_forward_hook(lambda *args: print(model))  # a closure hook
        handle._undo.push(hook.remove)
        with pytest.raises(TypeError, match=r"the hook .*<lambda> \(a closure\)"):
            copy.deepcopy(model)  # (pickle fails on any closure by itself)
    assert attachments_of(model) == [] and traces(model) == []
    assert not attention_interposer.is_installed()


def test_a_shallow_copy_of_an_attached_handle_is_refused() -> None:
    model = build_kind("llama")
    with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3)) as handle:
        with pytest.raises(TypeError, match="shallow copy"):
            copy.copy(handle)
        assert attachments_of(model) == [handle]


def test_hooks_of_the_copy_are_the_copy_s() -> None:
    """Every hook a prefix leaves in the copy (here: T5's position-bias pre-hooks) is bound to the
    copy's attachment, and removed by the copy's detach."""
    model = build_kind("t5")
    with make_adapter("prefix", model) as handle:
        twin = copy.deepcopy(model)
        twin_handle = only_attachment(twin)
        hooks = [hook for module in twin.modules() for hook in module._forward_pre_hooks.values()]
        assert hooks
        for hook in hooks:
            bound = [arg for arg in getattr(hook, "args", ()) if callable(arg) and hasattr(arg, "__self__")]
            assert bound and all(arg.__self__ is twin_handle for arg in bound), hook
            assert not any(getattr(arg, "__self__", None) is handle for arg in getattr(hook, "args", ()))
    twin_handle.detach()
    assert traces(twin) == []
