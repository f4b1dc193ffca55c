"""(IA)^3 checkpoints: our folders and PEFT's, both ways, with PEFT as the oracle.

* ours -> ours: every vector (and modules-to-save copy) and the outputs come back bit for bit;
* PEFT ``save_pretrained`` -> ``load_adapter``: PEFT's outputs (1e-5);
* ``save_adapter`` -> ``PeftModel.from_pretrained``: our outputs (1e-5), and the saved keys and
  shapes are exactly those PEFT writes for the same config;
* resuming training continues the loss curve; bad checkpoints raise and leave the model as it was.

Cases: llama (Linear), gpt2 (Conv1D), bert sequence classification (the classifier is saved
as a full copy), each with the family defaults, and llama with chosen targets and feed-forward
modules. Outputs are logits plus the last hidden state (``signal``), with random biases (``case``),
so a vector applied to the wrong side or dropped shows at 1e-5.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from safetensors.torch import load_file, save_file
from tiny_ia3 import case, randomise, signal
from tiny_models import build_model
from torch import nn

from prefix_hooks import Attachment
from prefix_hooks.checkpoint import codec_for_config, load_adapter, save_adapter
from prefix_hooks.ia3 import IA3Attachment, IA3Config, attach_ia3

ATOL = 1e-5
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "llama-custom": (
        "llama",
        {"target_modules": ["q_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj"]},
    ),
}
"""Case id -> (family, IA3Config fields beyond ``task_type``; none: the family defaults)."""
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
COPY_NOISE = 0.2


def perturb_copies(named: list[tuple[str, nn.Parameter]], seed: int = 9) -> None:
    """Move every modules-to-save copy away from its original (a fresh copy equals it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(named, key=lambda item: item[0]):
            if ".modules_to_save." in name:
                parameter.add_(COPY_NOISE * torch.randn(parameter.shape, generator=generator))


def trained_handle(case_id: str, seed: int = 5) -> tuple[nn.Module, IA3Attachment, dict[str, torch.Tensor]]:
    """A fresh model of the case, an adapter with random vectors and copies, and a padded batch."""
    family, fields = CASES[case_id]
    build, batch, task = case(family)
    model = build()
    handle = attach_ia3(model, IA3Config(task_type=task, **fields))
    randomise(handle, seed)
    perturb_copies(list(handle.named_parameters()), seed)
    return model, handle, batch


def peft_model_of(case_id: str) -> tuple[peft.PeftModel, dict[str, torch.Tensor]]:
    """PEFT's (IA)^3 for the case, random vectors and a perturbed classifier copy."""
    family, fields = CASES[case_id]
    build, batch, task = case(family)
    config = peft.IA3Config(task_type=task, init_ia3_weights=False, **copy.deepcopy(fields))
    model = peft.get_peft_model(build(), config).eval()
    perturb_copies(list(model.named_parameters()))
    return model, batch


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return signal(model, batch)


# --- ours -> ours ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASES)
def test_round_trip_is_bitwise(case_id: str, tmp_path: Path) -> None:
    model, handle, batch = trained_handle(case_id)
    save_adapter(handle, tmp_path)
    fresh = case(CASES[case_id][0])[0]()
    loaded = load_adapter(fresh, tmp_path)
    assert isinstance(loaded, IA3Attachment) and not loaded.is_attached
    saved, restored = dict(handle.named_parameters()), dict(loaded.named_parameters())
    assert sorted(saved) == sorted(restored)
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
        assert not restored[name].requires_grad  # loaded for inference by default
    with handle:
        expected = outputs(model, batch)
    with loaded:
        got = outputs(fresh, batch)
    assert (expected - outputs(fresh, batch)).abs().max() > 100 * ATOL
    assert torch.equal(got, expected)


# --- PEFT <-> ours ----------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASES)
def test_peft_checkpoint_gives_peft_outputs(case_id: str, tmp_path: Path) -> None:
    peft_model, batch = peft_model_of(case_id)
    peft_model.save_pretrained(str(tmp_path))
    ours = case(CASES[case_id][0])[0]()
    handle = load_adapter(ours, tmp_path)
    expected = outputs(peft_model, batch)
    base = outputs(ours, batch)
    with handle:
        got = outputs(ours, batch)
    assert (expected - base).abs().max() > 100 * ATOL
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", CASES)
def test_peft_loads_our_checkpoint_with_our_outputs(case_id: str, tmp_path: Path) -> None:
    model, handle, batch = trained_handle(case_id)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case(CASES[case_id][0])[0](), tmp_path).eval()
    with handle:
        expected = outputs(model, batch)
    assert (expected - outputs(model, batch)).abs().max() > 100 * ATOL
    torch.testing.assert_close(outputs(peft_model, batch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", CASES)
def test_saved_keys_shapes_and_config_are_peft_s(case_id: str, tmp_path: Path) -> None:
    _, handle, _ = trained_handle(case_id)
    save_adapter(handle, tmp_path / "ours")
    peft_model, _ = peft_model_of(case_id)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = {key: tuple(t.shape) for key, t in load_file(tmp_path / "ours" / WEIGHTS).items()}
    theirs = {key: tuple(t.shape) for key, t in load_file(tmp_path / "peft" / WEIGHTS).items()}
    assert ours == theirs
    our_config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    for key in ("peft_type", "fan_in_fan_out", "task_type"):
        assert our_config[key] == peft_config[key], key


# --- resume training ----------------------------------------------------------------------


def train(model: nn.Module, handle: Attachment, family: str, steps: int) -> list[float]:
    """``steps`` of plain SGD (no optimizer state, so a fresh optimizer continues exactly)."""
    batch = case(family)[1]
    labels = torch.tensor([0, 2, 1]) if family == "bert" else batch["input_ids"]
    optimizer = torch.optim.SGD([p for p in handle.parameters() if p.requires_grad], lr=0.5)
    losses = []
    with handle:
        for _ in range(steps):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_resumed_training_continues_the_loss_curve(family: str, tmp_path: Path) -> None:
    model, handle, _ = trained_handle(family)
    straight_model, straight, _ = trained_handle(family)
    expected = train(straight_model, straight, family, 4)
    first = train(model, handle, family, 2)
    save_adapter(handle, tmp_path)
    fresh = case(family)[0]()
    resumed = load_adapter(fresh, tmp_path, trainable=True)
    trainable = {name: tuple(p.shape) for name, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {name: tuple(p.shape) for name, p in straight.named_parameters()}
    second = train(fresh, resumed, family, 2)
    assert first + second == expected
    assert len(set(expected)) == 4  # the loss really moves
    finals = dict(straight.named_parameters())
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, finals[name]), name


# --- bad checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"missing keys \[.*layers\.0\.mlp\.down_proj\.ia3_l"),
        ("unexpected", r"unexpected keys \[.*layers\.0\.mlp\.up_proj\.ia3_l"),
        ("shape", r"down_proj\.ia3_l' has shape \(1, 63\).*needs \(1, 64\)"),
    ],
)
def test_bad_tensors_raise_and_leave_the_model_untouched(change: str, message: str, tmp_path: Path) -> None:
    _, handle, _ = trained_handle("llama")
    save_adapter(handle, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    key = min(tensors)  # ...layers.0.mlp.down_proj.ia3_l (1, intermediate)
    if change == "missing":
        del tensors[key]
    elif change == "unexpected":
        tensors[key.replace("down_proj", "up_proj")] = tensors[key].clone()
    else:
        tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / WEIGHTS)
    config = json.loads((tmp_path / CONFIG).read_text())
    del config["prefix_hooks"]["sha256"]  # as in a folder PEFT wrote: the codec must catch it
    (tmp_path / CONFIG).write_text(json.dumps(config))
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path: Path) -> None:
    _, handle, _ = trained_handle("gpt2")
    save_adapter(handle, tmp_path)
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"was saved for a 'gpt2' model"):  # the recorded architecture
        load_adapter(model, tmp_path)
    assert_untouched(model, before)
    # a folder without the record (as PEFT writes them): the codec's own key check refuses it
    config = json.loads((tmp_path / CONFIG).read_text())
    config["prefix_hooks"].pop("model_type")
    (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \[.*k_proj\.ia3_l.*unexpected keys \[.*c_attn\.ia3_l"):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_the_saved_form_is_a_snapshot() -> None:
    """``codec.save`` returns CPU copies: training on afterwards does not change what is written."""
    _, handle, _ = trained_handle("bert")
    saved = codec_for_config(handle.config).save(handle)
    before = {key: tensor.clone() for key, tensor in saved.tensors.items()}
    randomise(handle, seed=8)
    perturb_copies(list(handle.named_parameters()), seed=8)
    assert saved.tensors.keys() == before.keys()
    for key, tensor in saved.tensors.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[key]), key
