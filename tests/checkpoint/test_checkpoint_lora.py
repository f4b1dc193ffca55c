"""LoRA checkpoints: our folders and PEFT's, both ways, with PEFT as the oracle.

* ours -> ours: every tensor and the logits come back bit for bit;
* PEFT ``save_pretrained`` -> ``load_adapter``: PEFT's logits (1e-5);
* ``save_adapter`` -> ``PeftModel.from_pretrained``: our logits (1e-5), and the saved keys and
  shapes are exactly those PEFT writes for the same config;
* several named adapters; resuming training continues the loss curve;
* each bad checkpoint raises a clear error and leaves the model as it was.

Cases (``tiny_lora.CASES``): llama (Linear; also rsLoRA with rank/alpha patterns), gpt2 (Conv1D),
an Embedding target, bert sequence classification and ViT image classification with
``modules_to_save``, a Conv2d net; ``bias="all"`` / ``"lora_only"``
checkpoints hold base-model biases, which load only where they equal the model's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from safetensors.torch import load_file, save_file
from tiny_lora import CASES, NOISE, Case, is_adapter_key, randomise, run
from tiny_models import build_model
from torch import nn

from prefix_hooks import Attachment, attach
from prefix_hooks.checkpoint import codec_for_config, load_adapter, save_adapter
from prefix_hooks.ia3 import IA3Config, attach_ia3
from prefix_hooks.lora import LoraAttachment, LoraConfig, attach_lora

ATOL = 1e-5
MIN_EFFECT = 1e-3  # an adapter must move the logits by more than this, or a comparison proves nothing
CHECKPOINT_CASES = [
    "llama",
    "llama-rslora-patterns",
    "gpt2-conv1d",
    "llama-embedding",
    "bert-seq-cls",
    "vit-image-cls",
    "conv2d",
]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def trained_handle(case: Case, seed: int = 5) -> tuple[nn.Module, LoraAttachment]:
    """A fresh model of ``case`` and an adapter whose factors and copies are random (B != 0)."""
    model = case.build()
    handle = attach_lora(model, LoraConfig(**case.fields))
    randomise(handle, seed)
    return model, handle


def peft_model_of(case: Case, **fields: object) -> peft.PeftModel:
    """PEFT's LoRA for ``case`` with random factors and modules-to-save copies unlike their originals."""
    config = peft.LoraConfig(**copy.deepcopy({**case.fields, **fields}), **case.peft_only)
    model = peft.get_peft_model(case.build(), config).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if is_adapter_key(name):
                parameter.add_(NOISE * torch.randn(parameter.shape, generator=generator))
    return model


def save_peft(model: peft.PeftModel, path: Path, embedding_targeted: bool = False) -> None:
    if embedding_targeted:  # PEFT also writes the targeted embedding matrix, and says so
        with pytest.warns(UserWarning, match="save_embedding_layers"):
            model.save_pretrained(str(path))
    else:
        model.save_pretrained(str(path))


# --- ours -> ours ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CHECKPOINT_CASES)
def test_round_trip_is_bitwise(case_id: str, tmp_path: Path) -> None:
    case = CASES[case_id]
    model, handle = trained_handle(case)
    save_adapter(handle, tmp_path)
    fresh = case.build()
    loaded = load_adapter(fresh, tmp_path)
    assert isinstance(loaded, LoraAttachment) and not loaded.is_attached
    saved, restored = dict(handle.named_parameters()), dict(loaded.named_parameters())
    assert sorted(saved) == sorted(restored)
    for name, tensor in saved.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
        assert not restored[name].requires_grad  # loaded for inference by default
    inputs = case.inputs()
    with handle:
        expected = run(model, inputs)
    with loaded:
        got = run(fresh, inputs)
    assert (expected - run(fresh, inputs)).abs().max() > MIN_EFFECT
    assert torch.equal(got, expected)


def test_named_adapters_save_and_load_under_any_name(tmp_path: Path) -> None:
    """Keys carry no adapter name: two adapters saved apart load under new names and run together."""
    case = CASES["llama"]
    model = case.build()
    first = attach_lora(model, LoraConfig(**case.fields), adapter_name="first")
    second = attach_lora(model, LoraConfig(**{**case.fields, "target_modules": ["k_proj"]}), adapter_name="second")
    randomise(first, seed=1)
    randomise(second, seed=2)
    save_adapter(first, tmp_path / "first")
    save_adapter(second, tmp_path / "second")
    assert set(load_file(tmp_path / "first" / WEIGHTS)) == {
        PEFT_PREFIX + name.replace(".first.", ".") for name, _ in first.named_parameters()
    }
    fresh = case.build()
    one = load_adapter(fresh, tmp_path / "first", adapter_name="alpha")
    two = load_adapter(fresh, tmp_path / "second", adapter_name="beta")
    assert (one.adapter_name, two.adapter_name) == ("alpha", "beta")
    inputs = case.inputs()
    with first, second:
        expected = run(model, inputs)
    with one, two:
        got = run(fresh, inputs)
        assert any(".lora_A.alpha." in key for key in fresh.state_dict())
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# --- PEFT -> ours -------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CHECKPOINT_CASES)
def test_peft_checkpoint_gives_peft_logits(case_id: str, tmp_path: Path) -> None:
    case = CASES[case_id]
    peft_model = peft_model_of(case)
    save_peft(peft_model, tmp_path, embedding_targeted=case_id == "llama-embedding")
    ours = case.build()
    handle = load_adapter(ours, tmp_path)
    inputs = case.inputs()
    expected = run(peft_model, inputs)
    base = run(ours, inputs)
    with handle:
        got = run(ours, inputs)
    assert (expected - base).abs().max() > MIN_EFFECT
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# --- ours -> PEFT -------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CHECKPOINT_CASES)
def test_peft_loads_our_checkpoint_with_our_logits(case_id: str, tmp_path: Path) -> None:
    case = CASES[case_id]
    model, handle = trained_handle(case)
    save_adapter(handle, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    inputs = case.inputs()
    with handle:
        expected = run(model, inputs)
    assert (expected - run(model, inputs)).abs().max() > MIN_EFFECT
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case_id", CHECKPOINT_CASES)
def test_saved_keys_shapes_and_config_are_peft_s(case_id: str, tmp_path: Path) -> None:
    """The file holds exactly the keys and shapes PEFT writes for the same config (PEFT's optional
    copy of a targeted embedding matrix aside), and PEFT reads the same LoRA settings back."""
    case = CASES[case_id]
    _, handle = trained_handle(case)
    save_adapter(handle, tmp_path / "ours")
    peft_model = peft_model_of(case)
    save_peft(peft_model, tmp_path / "peft", embedding_targeted=case_id == "llama-embedding")
    ours = {key: tuple(t.shape) for key, t in load_file(tmp_path / "ours" / WEIGHTS).items()}
    theirs = {key: tuple(t.shape) for key, t in load_file(tmp_path / "peft" / WEIGHTS).items()}
    theirs = {key: shape for key, shape in theirs.items() if not key.endswith("embed_tokens.base_layer.weight")}
    assert ours == theirs
    our_config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    for key in ("peft_type", "r", "lora_alpha", "fan_in_fan_out", "bias", "use_rslora", "task_type"):
        assert our_config[key] == peft_config[key], key
    assert set(our_config["target_modules"]) == set(peft_config["target_modules"])


# --- resume training ----------------------------------------------------------------------


def labels_for(case_id: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor([0, 2]) if case_id == "bert-seq-cls" else inputs["input_ids"]


def train(model: nn.Module, handle: Attachment, case_id: str, steps: int) -> list[float]:
    """``steps`` of plain SGD (no optimizer state, so a fresh optimizer continues exactly)."""
    inputs = CASES[case_id].inputs()
    labels = labels_for(case_id, inputs)
    optimizer = torch.optim.SGD([p for p in handle.parameters() if p.requires_grad], lr=0.5)
    losses = []
    with handle:
        for _ in range(steps):
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case_id", ["llama", "bert-seq-cls"])
def test_resumed_training_continues_the_loss_curve(case_id: str, tmp_path: Path) -> None:
    case = CASES[case_id]
    model, handle = trained_handle(case)
    straight_model, straight = trained_handle(case)
    expected = train(straight_model, straight, case_id, 4)
    first = train(model, handle, case_id, 2)
    save_adapter(handle, tmp_path)
    fresh = case.build()
    resumed = load_adapter(fresh, tmp_path, trainable=True)
    trainable = {name: tuple(p.shape) for name, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {name: tuple(p.shape) for name, p in straight.named_parameters()}
    second = train(fresh, resumed, case_id, 2)
    assert first + second == expected
    assert len(set(expected)) == 4  # the loss really moves
    finals = dict(straight.named_parameters())
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, finals[name]), name


# --- bias="lora_only": the trained biases are base-model tensors --------------------------


def test_trained_biases_load_only_where_the_model_has_them(tmp_path: Path) -> None:
    """PEFT saves the trained biases; PEFT loading our folder reproduces the trained model. Ours
    loads them only onto a model holding exactly those biases (attach never changes the base)."""
    case = CASES["bert-seq-cls"]
    case = Case(case.build, case.inputs, {**case.fields, "bias": "lora_only"})
    model, handle = trained_handle(case)
    with handle:
        trained_biases = handle.trained_base_parameters()
        assert trained_biases
        with torch.no_grad():
            for bias in trained_biases:
                bias.add_(0.3)
        expected = run(model, case.inputs())
    save_adapter(handle, tmp_path)
    assert any(key.endswith(".base_layer.bias") for key in load_file(tmp_path / WEIGHTS))
    peft_model = peft.PeftModel.from_pretrained(case.build(), tmp_path).eval()
    torch.testing.assert_close(run(peft_model, case.inputs()), expected, atol=ATOL, rtol=0)
    same = load_adapter(model, tmp_path, adapter_name="again")
    with same:
        torch.testing.assert_close(run(model, case.inputs()), expected, atol=0, rtol=0)
    fresh = case.build()
    with pytest.raises(ValueError, match=r"base_layer\.bias.*base-model tensor"):
        load_adapter(fresh, tmp_path)


# --- bad checkpoints ------------------------------------------------------------------------


def rewrite(path: Path, change: str) -> None:
    """Corrupt the saved tensors of a llama q/v adapter in one way."""
    tensors = load_file(path / WEIGHTS)
    key = min(tensors)  # ...layers.0.self_attn.q_proj.lora_A.weight
    if change == "missing":
        del tensors[key]
    elif change == "unexpected":
        tensors[key.replace("q_proj", "o_proj")] = tensors[key].clone()
    elif change == "shape":
        tensors[key] = tensors[key][:-1].contiguous()
    elif change == "dtype":
        tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path / WEIGHTS)
    drop_checksums(path)


def drop_checksums(path: Path) -> None:
    """Forget the SHA-256 our writer records, as in a folder PEFT wrote: the codec's checks must then catch
    what the checksum would have."""
    config = json.loads((path / CONFIG).read_text())
    del config["prefix_hooks"]["sha256"]
    (path / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"missing keys \[.*q_proj\.lora_A\.weight"),
        ("unexpected", r"unexpected keys \[.*o_proj\.lora_A\.weight"),
        ("shape", r"q_proj\.lora_A\.weight' has shape \(3, 32\).*needs \(4, 32\)"),
        ("dtype", r"q_proj\.lora_A\.weight' has dtype torch.int32"),
    ],
)
def test_bad_tensors_raise_and_leave_the_model_untouched(change: str, message: str, tmp_path: Path) -> None:
    _, handle = trained_handle(CASES["llama"])
    save_adapter(handle, tmp_path)
    rewrite(tmp_path, change)
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path: Path) -> None:
    _, handle = trained_handle(CASES["gpt2-conv1d"])
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
    with pytest.raises(ValueError, match="c_attn"):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


def test_a_checkpoint_of_another_rank_is_refused(tmp_path: Path) -> None:
    """Same keys, other rank in the config: every factor has the wrong shape."""
    _, handle = trained_handle(CASES["llama"])
    save_adapter(handle, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "r": 2}))
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\).*needs \(2, 32\)"):
        load_adapter(model, tmp_path)
    assert_untouched(model, before)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_checkpoints_with_biases_have_our_keys_and_load(bias: str, tmp_path: Path) -> None:
    """With ``bias != "none"`` PEFT also writes the base biases (and, for ``"all"``, the copy's bias a
    second time); ours writes the same keys, and PEFT's folder loads where the biases are the model's."""
    case = CASES["bert-seq-cls"]
    case = Case(case.build, case.inputs, {**case.fields, "bias": bias})
    peft_model = peft_model_of(case)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    _, handle = trained_handle(case)
    save_adapter(handle, tmp_path / "ours")
    ours = {key: tuple(t.shape) for key, t in load_file(tmp_path / "ours" / WEIGHTS).items()}
    assert ours == {key: tuple(t.shape) for key, t in load_file(tmp_path / "peft" / WEIGHTS).items()}
    fresh = case.build()
    loaded = load_adapter(fresh, tmp_path / "peft")
    with loaded:
        torch.testing.assert_close(run(fresh, case.inputs()), run(peft_model, case.inputs()), atol=ATOL, rtol=0)


def test_attach_functions_take_a_saved_folder(tmp_path: Path) -> None:
    """``attach_lora(model, path)`` and ``attach(model, path, path)`` build the saved adapters."""
    case = CASES["llama"]
    model, handle = trained_handle(case)
    save_adapter(handle, tmp_path / "lora")
    ia3 = attach_ia3(model, IA3Config(init_ia3_weights=False), adapter_name="scale")
    save_adapter(ia3, tmp_path / "ia3")
    inputs = case.inputs()
    with handle:
        lora_only = run(model, inputs)
        with ia3:
            both = run(model, inputs)
    fresh = case.build()
    single = attach_lora(fresh, str(tmp_path / "lora"))
    assert isinstance(single, LoraAttachment)
    with single:
        torch.testing.assert_close(run(fresh, inputs), lora_only, atol=0, rtol=0)
    with attach(fresh, tmp_path / "lora", tmp_path / "ia3"):
        torch.testing.assert_close(run(fresh, inputs), both, atol=0, rtol=0)


def test_a_copy_bias_saved_twice_must_agree(tmp_path: Path) -> None:
    """PEFT's ``bias="all"`` file repeats the classifier copy's bias; two different values are refused."""
    case = CASES["bert-seq-cls"]
    case = Case(case.build, case.inputs, {**case.fields, "bias": "all"})
    peft_model_of(case).save_pretrained(str(tmp_path))
    tensors = load_file(tmp_path / WEIGHTS)
    tensors[f"{PEFT_PREFIX}classifier.modules_to_save.bias"] += 1.0
    save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=r"classifier\.modules_to_save\.bias' repeats a modules-to-save copy's bias"):
        load_adapter(case.build(), tmp_path)


def test_the_saved_form_is_a_snapshot() -> None:
    """``codec.save`` returns CPU copies: training on afterwards does not change what is written."""
    _, handle = trained_handle(CASES["bert-seq-cls"])
    saved = codec_for_config(handle.config).save(handle)
    before = {key: tensor.clone() for key, tensor in saved.tensors.items()}
    randomise(handle, seed=8)
    assert saved.tensors.keys() == before.keys()
    for key, tensor in saved.tensors.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, before[key]), key
