"""DoRA checkpoints: our folders and PEFT's, both ways, with PEFT as the oracle.

PEFT saves a DoRA magnitude as ``base_model.model.<target>.lora_magnitude_vector`` (its
in-model ``.weight`` dropped) and ``"use_dora": true`` in ``adapter_config.json``; ours writes
the same keys, shapes and flag, PEFT's folders load here with PEFT's logits, ours load in
PEFT with ours, and a resumed DoRA adapter trains its magnitudes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from restoration import assert_untouched, make_warm_model, snapshot
from safetensors.torch import load_file, save_file
from test_checkpoint_lora import drop_checksums, save_peft, train, trained_handle
from tiny_lora import DORA_CASES, Case, peft_twin, run
from transformers import PreTrainedModel

from prefix_hooks.checkpoint import load_adapter, save_adapter
from prefix_hooks.lora import LoraAttachment

ATOL = 1e-5
MIN_EFFECT = 1e-3  # an adapter must move the logits by more than this, or a comparison proves nothing
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAGNITUDE = ".lora_magnitude_vector"

__all__ = ["make_warm_model"]  # the fixture, imported for pytest


@pytest.mark.parametrize("case_id", list(DORA_CASES))
def test_round_trip_is_bitwise(case_id: str, tmp_path: Path) -> None:
    case = DORA_CASES[case_id]
    model, handle = trained_handle(case)
    inputs = case.inputs()
    with handle:
        expected = run(model, inputs)
    save_adapter(handle, tmp_path)
    fresh = case.build()
    loaded = load_adapter(fresh, tmp_path)
    saved, restored = dict(handle.named_parameters()), dict(loaded.named_parameters())
    assert sorted(saved) == sorted(restored) and any(MAGNITUDE in name for name in saved)
    assert all(torch.equal(restored[name], tensor) for name, tensor in saved.items())
    with loaded:
        assert torch.equal(run(fresh, inputs), expected)
    assert (expected - run(fresh, inputs)).abs().max() > MIN_EFFECT


@pytest.mark.parametrize("case_id", list(DORA_CASES))
def test_peft_checkpoint_gives_peft_logits(case_id: str, tmp_path: Path) -> None:
    case = DORA_CASES[case_id]
    peft_model, _, _ = peft_twin(case)
    save_peft(peft_model, tmp_path, embedding_targeted=case_id == "llama")
    assert json.loads((tmp_path / CONFIG).read_text())["use_dora"] is True
    ours = case.build()
    handle = load_adapter(ours, tmp_path)
    assert isinstance(handle, LoraAttachment) and handle.config.use_dora
    inputs = case.inputs()
    expected = run(peft_model, inputs)
    with handle:
        got = run(ours, inputs)
    assert (expected - run(ours, inputs)).abs().max() > MIN_EFFECT
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", list(DORA_CASES))
def test_peft_loads_our_checkpoint_with_our_logits(case_id: str, tmp_path: Path) -> None:
    case = DORA_CASES[case_id]
    model, handle = trained_handle(case)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    assert isinstance(config := peft_model.peft_config["default"], peft.LoraConfig) and config.use_dora
    inputs = case.inputs()
    with handle:
        expected = run(model, inputs)
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", ["llama", "gpt2", "conv2d"])
def test_saved_keys_shapes_and_config_are_peft_s(case_id: str, tmp_path: Path) -> None:
    case = DORA_CASES[case_id]
    _, handle = trained_handle(case)
    save_adapter(handle, tmp_path / "ours")
    peft_model, _, _ = peft_twin(case)
    save_peft(peft_model, tmp_path / "peft", embedding_targeted=case_id == "llama")
    ours = {key: tuple(t.shape) for key, t in load_file(tmp_path / "ours" / WEIGHTS).items()}
    theirs = {key: tuple(t.shape) for key, t in load_file(tmp_path / "peft" / WEIGHTS).items()}
    theirs = {key: shape for key, shape in theirs.items() if not key.endswith("embed_tokens.base_layer.weight")}
    assert ours == theirs
    assert sum(key.endswith(MAGNITUDE) for key in ours) == len(handle.target_names)
    our_config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    assert our_config["use_dora"] is True and "use_dora" not in our_config["prefix_hooks"]


def test_resumed_training_moves_the_magnitudes_on(tmp_path: Path) -> None:
    """``trainable=True`` resumes: the magnitudes train, and the loss curve continues exactly."""
    case = DORA_CASES["llama"]
    model, handle = trained_handle(case)
    straight_model, straight = trained_handle(case)
    expected = train(straight_model, straight, "llama", 4)  # the LoRA llama case's inputs and labels
    first = train(model, handle, "llama", 2)
    save_adapter(handle, tmp_path)
    fresh = case.build()
    resumed = load_adapter(fresh, tmp_path, trainable=True)
    assert isinstance(resumed, LoraAttachment)
    start = {name: p.detach().clone() for name, p in resumed.named_parameters() if MAGNITUDE in name}
    assert start and all(p.requires_grad for p in resumed.parameters())
    second = train(fresh, resumed, "llama", 2)
    assert first + second == expected and len(set(expected)) == 4  # the loss curve continues exactly
    finals = dict(straight.named_parameters())
    assert all(torch.equal(p, finals[name]) for name, p in resumed.named_parameters())
    assert all(not torch.equal(finals[name], value) for name, value in start.items())  # the magnitudes moved


BAD_MAGNITUDES = {  # how the file is changed -> what the load says
    "missing": r"missing keys \[.*q_proj\.lora_magnitude_vector'",
    "in-model key": r"unexpected keys \[.*q_proj\.lora_magnitude_vector\.weight'",
    "shape": r"q_proj\.lora_magnitude_vector' has shape \(31,\).*needs \(32,\)",
}


@pytest.mark.parametrize("change", list(BAD_MAGNITUDES))
def test_bad_magnitudes_raise_and_leave_the_model_untouched(
    change: str, tmp_path: Path, make_warm_model: Callable[..., PreTrainedModel]
) -> None:
    save_adapter(trained_handle(DORA_CASES["llama"])[1], tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj" + MAGNITUDE))
    if change == "missing":
        del tensors[key]
    elif change == "in-model key":
        tensors[key + ".weight"] = tensors.pop(key)
    else:
        tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, tmp_path / WEIGHTS)
    drop_checksums(tmp_path)  # as in a folder PEFT wrote: the codec's own checks must refuse it
    model = make_warm_model("llama", frozen_mask=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=BAD_MAGNITUDES[change]):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_a_plain_lora_checkpoint_is_not_read_as_dora(tmp_path: Path) -> None:
    """``use_dora`` flipped in the config: the magnitudes are missing, and the load says so."""
    case = DORA_CASES["gpt2"]
    _, handle = trained_handle(Case(case.build, case.inputs, {**case.fields, "use_dora": False}))
    save_adapter(handle, tmp_path)
    drop_checksums(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"missing keys \[.*c_attn\.lora_magnitude_vector'"):
        load_adapter(case.build(), tmp_path)
