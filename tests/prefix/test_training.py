"""Training through an attached prefix: gradients, gradient checkpointing, an optimizer
loop and mixed precision, with unchanged user code inside ``with attach_prefix(...)``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from shared_fixtures import assert_bitwise_equal, checkpointing_enabled, clone_state
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

FAMILIES = ("llama", "gpt2")
NUM_VIRTUAL_TOKENS = 4
BSZ = 2
SEQ_LEN = 6
CHILD_PREFIX = "prefix_hooks_default."
# Dropout off, so train-mode forwards (which checkpointing needs) are deterministic.
NO_DROPOUT: dict[str, dict[str, Any]] = {
    "llama": {"attention_dropout": 0.0},
    "gpt2": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
}


def tiny_model(family: str, **overrides: Any) -> PreTrainedModel:
    return build_model(family, "sdpa", **NO_DROPOUT[family], **overrides)


def attach(model: nn.Module, projection: bool = False, seed: int = 1) -> PrefixAttachment:
    """An adapter whose prefix is far from zero (the default init of nn.Embedding, reseeded)."""
    handle = attach_prefix(
        model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=projection)
    )
    nn.init.normal_(handle.encoder.embedding.weight, generator=torch.Generator().manual_seed(seed))
    return handle


def lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = random_batch(BSZ, SEQ_LEN, seed=seed, left_pad=[0, 2])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


# --- 1. gradients reach the encoder and nothing else ----------------------------------


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_only_encoder_parameters_get_gradients(family: str, projection: bool) -> None:
    model = tiny_model(family)
    base_names = [name for name, _ in model.named_parameters()]
    handle = attach(model, projection)
    with handle:
        model(**lm_batch()).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        frozen = {name: p.requires_grad for name, p in model.named_parameters() if name in base_names}

    assert not any(frozen.values()), "base parameters must be frozen while attached"
    encoder_names = [CHILD_PREFIX + name for name, _ in handle.named_parameters()]
    assert set(grads) == set(base_names) | set(encoder_names)
    assert [name for name in base_names if grads[name] is not None] == []
    for name in encoder_names:
        grad = grads[name]
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name} got a zero or non-finite gradient"
    # detach restores trainability and leaves no gradient behind on the base
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# --- 2. gradient checkpointing ----------------------------------------------------------


def count_attention_calls(model: nn.Module, handle: PrefixAttachment) -> tuple[list[int], list[Any]]:
    """Count forward calls of every attention module (a recompute calls them again)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    hooks = [site.module.register_forward_pre_hook(count) for site in handle.family.attention_sites(model)]
    return calls, hooks


def checkpointing_state(model: nn.Module) -> dict[str, tuple[bool, Any]]:
    return {
        name: (module.gradient_checkpointing, module.__dict__.get("_gradient_checkpointing_func"))
        for name, module in model.named_modules()
        if hasattr(module, "gradient_checkpointing")
    }


def encoder_grads(family: str, projection: bool, checkpointing: dict[str, Any] | None, when: str) -> dict[str, Any]:
    """Train-mode forward and backward inside the block.

    ``checkpointing``: ``None`` for off, else the ``gradient_checkpointing_kwargs`` (``{}``
    for transformers' default); enabled ``when`` is "before" or "after" attaching.
    """
    model = tiny_model(family).train()
    # gradient_checkpointing_enable is the documented entry point; 5.23 deprecates it for
    # activation_checkpointing_enable (its FutureWarning is ignored in pyproject) and forwards to it
    kwargs = {"gradient_checkpointing_kwargs": checkpointing} if checkpointing else {}
    if checkpointing is not None and when == "before":
        model.gradient_checkpointing_enable(**kwargs)
    handle = attach(model, projection)
    num_layers = len(handle.family.attention_sites(model))
    calls, hooks = count_attention_calls(model, handle)
    with handle:
        if checkpointing is not None and when == "after":
            model.gradient_checkpointing_enable(**kwargs)
        user_state = checkpointing_state(model)
        model(**lm_batch()).loss.backward()  # backward before detach (DESIGN.md)
    for hook in hooks:
        hook.remove()
    return {
        "grads": {name: torch.clone(p.grad) for name, p in handle.named_parameters() if p.grad is not None},
        "calls": calls[0],
        "num_layers": num_layers,
        "user_state": user_state,
        "model": model,
    }


@pytest.mark.parametrize("use_reentrant", [None, True], ids=["default", "reentrant"])
@pytest.mark.parametrize("when", ["before", "after"], ids=["enable_before_attach", "enable_after_attach"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_encoder_gradients(
    family: str, projection: bool, when: str, use_reentrant: bool | None
) -> None:
    reference = encoder_grads(family, projection, None, when)
    checkpointing = {} if use_reentrant is None else {"use_reentrant": use_reentrant}
    result = encoder_grads(family, projection, checkpointing, when)

    # checkpointing really ran: every attention module was called again on the recompute
    assert reference["calls"] == reference["num_layers"]
    assert result["calls"] == 2 * result["num_layers"]
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=0, msg=name)

    # after detach the checkpointing state is exactly what the user set
    model = result["model"]
    assert checkpointing_enabled(model)
    assert checkpointing_state(model) == result["user_state"]
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    embedding_hooks = model.get_input_embeddings()._forward_hooks
    assert [hook.id in embedding_hooks for hook in model._require_grads_hooks] == [True]


# --- 3. a manual training loop ----------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_loop_lowers_loss_and_leaves_base_untouched(family: str, projection: bool) -> None:
    # a larger init makes the tiny model's output sensitive enough for a prefix to matter
    model = tiny_model(family, initializer_range=0.2)
    base_state = clone_state(model)
    sequence = random_batch(1, 12, seed=3)["input_ids"]  # the task: continue this fixed sequence
    handle = attach_prefix(
        model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=projection)
    )
    encoder_state = clone_state(handle.encoder)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=0.1)
    losses = []
    with handle:
        for _ in range(30):
            loss = model(input_ids=sequence, labels=sequence).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0], losses
    assert_bitwise_equal(base_state, clone_state(model))
    assert all(p.grad is None for p in model.parameters())
    trained = clone_state(handle.encoder)
    assert all(not torch.equal(trained[name], encoder_state[name]) for name in encoder_state)


# --- 4. mixed precision -----------------------------------------------------------------


def assert_close_relative_to_prefix_effect(logits: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> None:
    """``logits`` match ``reference`` (float32, with the prefix) far better than ``base`` (no prefix) does."""
    error = (logits.float() - reference).abs().max()
    prefix_effect = (reference - base).abs().max()
    assert error < 0.1 * prefix_effect, f"bf16 error {error:.4f} vs prefix effect {prefix_effect:.4f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_with_float32_encoder(family: str) -> None:
    reference_model = tiny_model(family)
    model = tiny_model(family).bfloat16()
    base_state = clone_state(model)
    batch = lm_batch()
    base_logits = reference_model(**batch).logits.detach()
    with attach(reference_model):
        reference_logits = reference_model(**batch).logits.detach()  # float32, same prefix
    handle = attach(model)
    with handle:
        output = model(**batch)
        output.loss.backward()

    assert output.logits.dtype == torch.bfloat16
    assert_close_relative_to_prefix_effect(output.logits, reference_logits, base_logits)
    for name, parameter in handle.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.parameters())
    assert_bitwise_equal(base_state, clone_state(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_bf16_forward_and_backward(family: str) -> None:
    model = tiny_model(family)
    batch = lm_batch()
    base_logits = model(**batch).logits.detach()
    handle = attach(model)
    with handle:
        reference_logits = model(**batch).logits.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(**batch)
        output.loss.backward()

    assert output.logits.dtype == torch.bfloat16
    assert_close_relative_to_prefix_effect(output.logits, reference_logits, base_logits)
    for name, parameter in handle.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
