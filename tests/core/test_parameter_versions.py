"""Memoized adapter outputs (folded prefix projection, per-layer prefix views, P-tuning head)
must follow every parameter update, including fused optimizers, which update the storage
without bumping ``_version``. Oracles: the same forward after detaching and attaching again
(which drops every memo), and in float32 the forward with gradients enabled (which reads none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import Attachment, PrefixTuningConfig, PromptEncoderConfig, attach_prefix, attach_prompt
from prefix_hooks.core import parameter_versions

CASES: dict[str, tuple[Callable[[nn.Module], Attachment], torch.dtype]] = {
    "prefix+projection": (
        lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)),
        torch.float32,
    ),
    "prefix-bf16": (lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3)), torch.bfloat16),
    "p-tuning": (lambda model: attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3)), torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_memoized_outputs_follow_an_optimizer_step(case: str, optimizer: str) -> None:
    factory, dtype = CASES[case]
    model: Any = build_model("llama")
    model.to(dtype)
    batch = random_batch(2, 5, seed=1)
    handle = factory(model)
    with handle:
        with torch.no_grad():
            before = model(**batch).logits  # fills the memos
        opt = torch.optim.AdamW(handle.parameters(), lr=0.1, fused=optimizer == "fused", foreach=optimizer == "foreach")
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            memo = model(**batch).logits
        with_grad = model(**batch).logits.detach()  # grad enabled: computed without any memo
    with handle, torch.no_grad():  # attaching drops every memo
        fresh = model(**batch).logits
    assert (fresh - before).abs().max() > 1e-2  # the step changed the adapter
    assert torch.equal(memo, fresh)
    if dtype == torch.float32:  # (bf16 differs by rounding between the merged and concatenated paths)
        torch.testing.assert_close(memo, with_grad, atol=1e-5, rtol=0)


def test_a_step_taken_while_detached_is_seen_on_the_next_attach() -> None:
    model = build_model("llama")
    batch = random_batch(2, 5, seed=2)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    with handle:
        model(**batch, labels=batch["input_ids"]).loss.backward()
        with torch.no_grad():
            model(**batch)  # memo filled
    torch.optim.AdamW(handle.parameters(), lr=0.1, fused=True).step()  # nothing attached: not counted
    with handle:
        with torch.no_grad():
            memo = model(**batch).logits
        fresh = model(**batch).logits.detach()
    torch.testing.assert_close(memo, fresh, atol=1e-5, rtol=0)


def test_the_global_step_hook_lives_only_while_attached() -> None:
    model = build_model("llama")
    before = snapshot(model)
    from torch.optim import optimizer as optimizer_module

    hooks = optimizer_module._global_optimizer_post_hooks
    count = len(hooks)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
    with handle:
        assert len(hooks) == count + 1
        steps = parameter_versions.optimizer_steps()
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()
        assert parameter_versions.optimizer_steps() == steps + 1
    assert len(hooks) == count
    assert_untouched(model, before)
