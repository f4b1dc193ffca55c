"""torch.compile with every adapter method on a tiny Llama.

Oracles: the same model built twice from one seed, run eagerly with and without an identical
adapter (``_Twin``); never our own compiled output. Each method is measured both ways round:

- attach, then compile: the compiled object equals eager-with-adapter; after detach it equals
  the base model (Dynamo's guards notice removed hooks, a swapped-back module, the registry);
- compile (and run), then attach: Dynamo does not guard on new hooks, so without
  ``prefix_hooks.core.compiled.prepare_for_attach`` (which resets Dynamo when it finds a compile
  mark) an IA3 adapter would be silently ignored. The base is frozen before compiling, so a
  flipped ``requires_grad`` cannot trigger the recompile by accident.

Backends: ``inductor`` (C++ codegen, the default) for prefix and LoRA forwards and the prefix
training step; ``eager`` where only Dynamo's tracing and guards are under test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import tiny_ia3
import tiny_lora
import tiny_prompt
import torch
import torch._dynamo
from restoration import assert_untouched, snapshot, warm_up
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import (
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixAttachment,
    PrefixTuningConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.core.compiled import compile_marks, is_compiled

P = 3
ATOL = 1e-5
METHODS = ("prefix", "lora", "prompt", "ia3")


def _randomise_prefix(handle: PrefixAttachment) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def make_adapter(method: str, model: nn.Module) -> Attachment:
    """A not-yet-attached adapter of ``method`` with seeded non-trivial weights (the same for two
    models built from one seed)."""
    if method == "prefix":
        prefix = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"))
        _randomise_prefix(prefix)
        return prefix
    if method == "lora":
        lora = attach_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        tiny_lora.randomise(lora)
        return lora
    if method == "prompt":
        # PEFT's layout (the prompt in front of left padding): test_integration_precision compares with PEFT
        prompt = attach_prompt(
            model, PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM", virtual_token_placement="peft")
        )
        return tiny_prompt.randomise_prompt(prompt)
    ia3 = attach_ia3(model, IA3Config(task_type="CAUSAL_LM"))
    tiny_ia3.randomise(ia3)
    return ia3


def batch() -> dict[str, torch.Tensor]:
    return random_batch(2, 6, seed=1, left_pad=[0, 2])


@torch.no_grad()
def logits(model: Callable[..., Any]) -> torch.Tensor:
    return model(**batch()).logits  # (B, T, V)


def build_llama() -> nn.Module:
    """One decoder layer: Dynamo's tracing time grows with the layers, the behaviour does not."""
    return build_model("llama", num_hidden_layers=1)


class _Twin:
    """Eager oracle: a second model from the same seed, with an identical adapter."""

    def __init__(self, method: str) -> None:
        model = build_llama()
        self.base = logits(model)
        with make_adapter(method, model):
            self.adapted = logits(model)
        assert (self.adapted - self.base).abs().max() > 1e-2, "the adapter must change the logits"


def compile_model(model: nn.Module, style: str, backend: str) -> Callable[..., Any]:
    """``torch.compile(model)`` (returns the wrapper) or ``model.compile()`` (compiles in place)."""
    if style == "wrapper":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "style"),
    [("prefix", "in_place"), ("lora", "wrapper"), ("prompt", "in_place"), ("ia3", "wrapper"), ("ia3", "in_place")],
)
def test_attach_after_compile_takes_effect_and_detach_removes_it(method: str, style: str) -> None:
    """Compile and run the base, attach: the compiled object runs the adapter (retraced); detach:
    the base again. The second trace has the adapter, so this also covers detach after compiling."""
    twin = _Twin(method)
    model = build_llama().requires_grad_(False)  # attach flips no requires_grad guard
    compiled = compile_model(model, style, "eager")
    torch.testing.assert_close(logits(compiled), twin.base, atol=ATOL, rtol=0)  # traced without the adapter
    with make_adapter(method, model):
        torch.testing.assert_close(logits(compiled), twin.adapted, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(compiled), twin.base, atol=ATOL, rtol=0)


# Dynamo hides this warning of its own (its ``hasattr(tensor, "grad")`` while tracing the prefix
# state) from showwarning, but pytest's error filter raises it before that
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.slow
def test_attach_then_compile_inductor_training_step_matches_eager() -> None:
    """The documented order, through inductor (C++ forward and backward graphs): one prefix
    training step gives the eager twin's loss and encoder gradients; after detach the same
    compiled object gives the base model's loss."""
    twin_model = build_llama().train()
    inputs = {**batch(), "labels": batch()["input_ids"]}
    base_loss = twin_model(**inputs).loss.detach()
    with make_adapter("prefix", twin_model) as twin_handle:
        twin_model(**inputs).loss.backward()
        expected = {name: p.grad for name, p in twin_handle.named_parameters()}
        expected_loss = twin_model(**inputs).loss.detach()

    model = build_llama().train()
    with make_adapter("prefix", model) as handle:
        compiled = torch.compile(model)
        loss = compiled(**inputs).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), expected_loss, atol=ATOL, rtol=0)
        grads = {name: p.grad for name, p in handle.named_parameters()}
    assert expected.keys() == grads.keys() and expected
    for name, grad in expected.items():
        assert grad is not None and grad.abs().max() > 0
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).loss, base_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_attaching_to_the_compile_wrapper_is_refused_untouched(method: str) -> None:
    model = build_model("llama")
    warm_up(model)
    wrapper = cast(nn.Module, torch.compile(model, backend="eager"))  # lazy: nothing is traced before a call
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match="OptimizedModule"):
        make_adapter(method, wrapper).attach()
    assert_untouched(model, before)


def test_compile_marks_name_each_way_of_compiling() -> None:
    model = build_model("llama")
    assert compile_marks(model) == [] and not is_compiled(model)
    torch.compile(model, backend="eager")
    assert compile_marks(model) == ["torch.compile(model)"]
    other = build_model("llama")
    other.compile(backend="eager")
    assert compile_marks(other) == ["model.compile()"]
    third = build_model("llama")
    third.model.layers[0] = torch.compile(third.model.layers[0], backend="eager")
    assert compile_marks(third) == [
        "model.model.layers.0 is a torch.compile wrapper",
        "torch.compile(model.model.layers.0._orig_mod)",
    ]
    assert is_compiled(third)
