"""(IA)^3 against PEFT on identical weights: logits (eval and train mode, left-padded batches),
merged weights, generation, gradients, several adapters at once, bfloat16, and the state-dict
format in both directions. Also against a hand-written fold of the vectors into the weights
(``tiny_ia3.fold_by_hand``), an oracle that shares nothing with either implementation.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import peft
import pytest
import torch
from tiny_ia3 import case, fold_by_hand, randomise, signal
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks.ia3 import IA3Attachment, IA3Config, attach_ia3

ATOL = 1e-5
FAMILIES = ("llama", "gpt2", "bert")


def peft_twin(model: nn.Module, task: str, adapter_name: str = "default", **fields: Any) -> peft.PeftModel:
    """PEFT's IA3 on a deep copy of ``model`` (identical weights), random vectors."""
    config = peft.IA3Config(task_type=task, init_ia3_weights=False, **fields)
    return peft.get_peft_model(copy.deepcopy(model), config, adapter_name=adapter_name)


def ours_and_peft(family: str, **fields: Any) -> tuple[PreTrainedModel, IA3Attachment, peft.PeftModel, dict[str, torch.Tensor]]:
    build, batch, task = case(family)
    model = build()
    twin = peft_twin(model, task, **fields)
    handle = attach_ia3(model, IA3Config(task_type=task, **fields))
    handle.load_peft_state_dict(peft.get_peft_model_state_dict(twin))
    return model, handle, twin, batch


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_peft_on_a_padded_batch(family: str) -> None:
    model, handle, twin, batch = ours_and_peft(family)
    with torch.no_grad():
        base = signal(model, batch)
        with handle:
            ours = signal(model, batch)
        theirs = signal(twin, batch)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours - base).abs().max() > 100 * ATOL  # the vectors really act


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_loss_and_gradients_match_peft(family: str) -> None:
    model, handle, twin, batch = ours_and_peft(family)
    labels = batch["input_ids"] if family != "bert" else torch.tensor([0, 2, 1])
    model.train()
    twin.train()
    with handle:
        torch.manual_seed(3)
        ours = model(**batch, labels=labels).loss
        ours.backward()
        grads = {name: p.grad for name, p in handle.named_parameters()}
    torch.manual_seed(3)
    theirs = twin(**batch, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    their_grads = {
        name.removeprefix("base_model.model."): p.grad for name, p in twin.named_parameters() if p.requires_grad
    }
    assert set(grads) == set(their_grads)
    for name, grad in grads.items():
        assert grad is not None and their_grads[name] is not None
        torch.testing.assert_close(grad, their_grads[name], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged_equals_peft_merged_and_the_hand_fold(family: str) -> None:
    model, handle, twin, batch = ours_and_peft(family)
    oracle = copy.deepcopy(model)
    fold_by_hand(oracle, {t.name: (handle.vector(t.name), t.feedforward) for t in handle.targets})
    for saved in handle.modules_to_save_names:  # PEFT's classifier copy equals the original here
        assert saved == "classifier"
    with torch.no_grad(), handle:
        unmerged = signal(model, batch)
        handle.merge()
        merged = signal(model, batch)
        handle.unmerge()
        again = signal(model, batch)
        twin.merge_adapter()
        peft_merged = signal(twin, batch)
        by_hand = signal(oracle, batch)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    torch.testing.assert_close(peft_merged, merged, atol=ATOL, rtol=0)
    torch.testing.assert_close(by_hand, unmerged, atol=ATOL, rtol=0)
    assert torch.equal(again, unmerged)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_cache_matches_without_and_peft(family: str) -> None:
    model, handle, twin, _ = ours_and_peft(family)
    prompt = random_batch(2, 5, seed=2, left_pad=[0, 2])
    settings: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), handle:
        cached = model.generate(**prompt, **settings)  # type: ignore[operator]
        uncached = model.generate(**prompt, **settings, use_cache=False)  # type: ignore[operator]
    theirs = twin.generate(**prompt, **settings)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)


def test_state_dict_round_trips_through_peft() -> None:
    build, batch, task = case("bert")
    model = build()
    handle = attach_ia3(model, IA3Config(task_type=task))
    randomise(handle, seed=7)
    with torch.no_grad():
        dict(handle.named_parameters())["classifier.modules_to_save.default.weight"].mul_(2.0)  # trained away
    twin = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(task_type=task))
    result = peft.set_peft_model_state_dict(twin, handle.peft_state_dict())
    assert not result.unexpected_keys  # type: ignore[attr-defined]
    saved = peft.get_peft_model_state_dict(twin)
    ours = handle.peft_state_dict()
    assert set(saved) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(saved[key], tensor), key
    with torch.no_grad(), handle:
        torch.testing.assert_close(signal(model, batch), signal(twin, batch), atol=ATOL, rtol=0)


def test_loading_a_state_dict_is_strict_and_atomic() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config())
    good = {key: torch.full_like(value, 2.0) for key, value in handle.peft_state_dict().items()}
    before = {key: value.clone() for key, value in handle.peft_state_dict().items()}
    first = next(iter(good))
    with pytest.raises(KeyError, match="missing keys.*k_proj.ia3_l"):
        handle.load_peft_state_dict({k: v for k, v in good.items() if k != first})
    with pytest.raises(KeyError, match="unexpected keys.*'extra'"):
        handle.load_peft_state_dict({**good, "extra": torch.ones(1)})
    with pytest.raises(ValueError, match=r"has shape \(3, 1\)"):
        handle.load_peft_state_dict({**good, first: torch.ones(3, 1)})
    for key, value in handle.peft_state_dict().items():
        assert torch.equal(value, before[key])
    handle.load_peft_state_dict(good)
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in handle.peft_state_dict().values())


def test_two_adapters_multiply_as_peft_active_adapters() -> None:
    model = build_model("llama")
    batch = random_batch(2, 6, seed=3, left_pad=[0, 1])
    twin = peft_twin(model, "CAUSAL_LM", adapter_name="first")
    twin.add_adapter("second", peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    cast(Any, twin.base_model).set_adapter(["first", "second"])
    state = peft.get_peft_model_state_dict
    first = attach_ia3(model, IA3Config(), "first")
    second = attach_ia3(model, IA3Config(), "second")
    first.load_peft_state_dict(state(twin, adapter_name="first"))
    second.load_peft_state_dict(state(twin, adapter_name="second"))
    with torch.no_grad(), first, second:
        ours = signal(model, batch)
        with first.disabled():
            only_second = signal(model, batch)
    theirs = signal(twin, batch)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    cast(Any, twin.base_model).set_adapter("second")
    torch.testing.assert_close(only_second, signal(twin, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_matches_peft_bit_for_bit_and_merge_restores_exactly(family: str) -> None:
    model = build_model(family)
    cast(Any, model).to(torch.bfloat16)  # transformers' decorated .to() confuses mypy
    batch = random_batch(2, 6, seed=4, left_pad=[0, 2])
    twin = peft_twin(model, "CAUSAL_LM")
    handle = attach_ia3(model, IA3Config())
    handle.load_peft_state_dict(peft.get_peft_model_state_dict(twin))
    assert all(v.dtype == torch.float32 for _, v in handle.named_parameters())  # as PEFT's autocast
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        with handle:
            ours = signal(model, batch)
            handle.merge()
            merged = signal(model, batch)
        theirs = signal(twin, batch)
        twin.merge_adapter()
        peft_merged = signal(twin, batch)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    assert torch.equal(merged, peft_merged)
    for name, parameter in model.named_parameters():  # detached while merged: originals, bit for bit
        assert torch.equal(parameter, weights[name]), name
