"""Training encoder-decoder prefixes: which slots get gradients, and gradient checkpointing.

Oracles: the layout's documented slot map (every used slot, and only those, gets a gradient)
and the same backward without checkpointing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_seq2seq import build, decoder_input_ids, depths, encoder_inputs, randomise

from prefix_hooks import PrefixTuningConfig, attach_prefix

P = 3  # num_virtual_tokens


def _gradients(family: str, layout: str, projection: bool, checkpointing: bool) -> dict[str, torch.Tensor]:
    """The prefix encoder's parameter gradients after one train-mode forward and backward."""
    model: Any = build(family).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout, prefix_projection=projection)
    handle = attach_prefix(model, config)
    randomise(handle.encoder)
    inputs = encoder_inputs(family, pad=[0, 2] if family != "whisper" else None)
    with handle:
        model(**inputs, labels=decoder_input_ids(seed=5)).loss.backward()  # backward before detach
    return {name: parameter.grad for name, parameter in handle.encoder.named_parameters() if parameter.grad is not None}


def _slot_gradient_norms(family: str, layout: str, num_layers: int) -> torch.Tensor:
    """``(L,)``: the gradient norm of each slot of the plain prefix embedding."""
    grad = _gradients(family, layout, projection=False, checkpointing=False)["embedding.weight"]  # (P, L*2*H*D)
    return grad.view(P, num_layers, -1).norm(dim=(0, 2))


@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_seq2seq_every_used_slot_and_only_those_gets_gradients(family: str) -> None:
    model = build(family)
    depth_e, depth_d = depths(model)
    full = _slot_gradient_norms(family, "full", depth_e + 2 * depth_d)
    assert (full > 0).all()
    peft = _slot_gradient_norms(family, "peft", depth_e)
    used = {2 * i % depth_e for i in range(depth_d)}  # PEFT's slot for decoder layer i
    assert [bool(norm > 0) for norm in peft] == [slot in used for slot in range(depth_e)]


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_gradient_checkpointing_gives_the_same_gradients(family: str, projection: bool) -> None:
    reference = _gradients(family, "full", projection, checkpointing=False)
    checkpointed = _gradients(family, "full", projection, checkpointing=True)
    assert reference.keys() == checkpointed.keys() and reference
    for name, grad in reference.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)
