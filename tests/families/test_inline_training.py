"""Training and the attach/detach lifecycle on the inline-attention families.

* gradients reach the prefix encoder (and nothing else), and one optimizer step changes it;
* gradient checkpointing (default and reentrant) gives the same encoder gradients as without,
  and really recomputes the hooked attention modules;
* detach leaves no trace after forwards, ``generate`` and a backward (``test_lifecycle.snapshot``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_inline import VARIANTS, build_variant, variant_backend_pairs
from tiny_models import random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

P = 4
BSZ = 2
SEQ_LEN = 6
CHILD_PREFIX = "prefix_hooks_default."
TRAIN_VARIANTS = ("falcon", "falcon_alibi", "gptj", "codegen", "gpt_neo", "bloom", "mpt")


def attach(model: nn.Module, projection: bool = False, seed: int = 1) -> PrefixAttachment:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection))
    nn.init.normal_(handle.encoder.embedding.weight, generator=torch.Generator().manual_seed(seed))
    return handle


def lm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = random_batch(BSZ, SEQ_LEN, seed=seed, left_pad=[0, 2])
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


# --- 1. gradients and an optimizer step -------------------------------------------------
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_inline_training_step_changes_only_the_encoder(variant: str, projection: bool) -> None:
    model = build_variant(variant, "eager").train()
    base_names = [name for name, _ in model.named_parameters()]
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    handle = attach(model, projection)
    before = {name: p.detach().clone() for name, p in handle.named_parameters()}
    with handle:
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
        model(**lm_batch()).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        optimizer.step()

    assert [name for name in base_names if grads[name] is not None] == []
    for name, value in before.items():
        grad = grads[CHILD_PREFIX + name]
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert not torch.equal(dict(handle.named_parameters())[name], value), f"{name} did not change"
    assert all(torch.equal(base_state[name], tensor) for name, tensor in model.state_dict().items())


# --- 2. gradient checkpointing ------------------------------------------------------------
def encoder_grads(variant: str, checkpointing: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], int, int]:
    """Encoder gradients of one train-mode step; also the attention calls and the layer count."""
    model = build_variant(variant, "eager").train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    handle = attach(model, projection=True)
    sites = handle.family.attention_sites(model)
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    hooks = [site.module.register_forward_pre_hook(count) for site in sites]
    with handle:
        model(**lm_batch()).loss.backward()  # backward before detach (DESIGN.md)
    for hook in hooks:
        hook.remove()
    grads = {name: torch.clone(p.grad) for name, p in handle.named_parameters() if p.grad is not None}
    return grads, calls[0], len(sites)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_inline_gradient_checkpointing_gives_the_same_gradients(variant: str, use_reentrant: bool) -> None:
    reference, reference_calls, layers = encoder_grads(variant, None)
    result, calls, _ = encoder_grads(variant, {"use_reentrant": use_reentrant})
    assert reference_calls == layers and calls == 2 * layers, "checkpointing must recompute every attention module"
    assert result.keys() == reference.keys() and reference
    for name, grad in reference.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(result[name], grad, atol=1e-6, rtol=0, msg=name)


# --- 3. no trace --------------------------------------------------------------------------
def _exercise(model: PreTrainedModel, handle: PrefixAttachment) -> None:
    batch = random_batch(2, 5, seed=3, left_pad=[0, 1])
    with torch.no_grad():
        model(**batch)
        model(**batch, use_cache=False)
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)  # type: ignore[operator]
        with handle.disabled():
            model(**batch)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    model.eval()


@pytest.mark.parametrize(("variant", "impl"), variant_backend_pairs(tuple(VARIANTS)))
def test_inline_detach_leaves_no_trace(variant: str, impl: str) -> None:
    model = build_variant(variant, impl)
    warm_up(model)
    before = snapshot(model)
    handle = attach(model)
    with handle:
        _exercise(model, handle)
    assert_untouched(model, before)
