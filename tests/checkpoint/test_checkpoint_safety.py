"""Loading refuses bad folders with a clear error and leaves the model exactly as it was.

Each corruption is applied alone to a good saved folder; the model is snapshotted (see
``test_lifecycle.snapshot``) before the load and compared after the error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from safetensors.torch import load_file, save_file
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    attach,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.checkpoint import CheckpointError, load_adapter
from prefix_hooks.checkpoint.codec import (
    CONFIG_NAME,
    EXTRA_CONFIG_KEY,
    EXTRA_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
)

Corruption = Callable[[Path], None]
Builder = Callable[[nn.Module], Any]
# method -> (adapter on a llama, the same method on a gpt2, a config edit giving other dims, another peft_type)
ADAPTERS: dict[str, Builder] = {
    "lora": lambda model: attach_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
    "ia3": lambda model: attach_ia3(
        model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ),
    "prefix": lambda model: attach_prefix(
        model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8)
    ),
    "p_tuning": lambda model: attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)),
}
ON_GPT2: dict[str, Builder] = {
    "lora": lambda model: attach_lora(model, LoraConfig(r=2, target_modules=["c_attn"])),
    "ia3": lambda model: attach_ia3(model, IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])),
    "prefix": ADAPTERS["prefix"],
    "p_tuning": ADAPTERS["p_tuning"],
}
OTHER_DIMS: dict[str, dict[str, Any]] = {
    "LORA": {"r": 3},
    "IA3": {"target_modules": ["q_proj", "down_proj"]},
    "PREFIX_TUNING": {"num_virtual_tokens": 4},
    "P_TUNING": {"num_virtual_tokens": 4},
}
METHOD_OF = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "P_TUNING": "p_tuning"}
OTHER_TYPE = {"LORA": "IA3", "IA3": "LORA", "PREFIX_TUNING": "P_TUNING", "P_TUNING": "PREFIX_TUNING"}


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _without_checksums(folder: Path) -> None:
    """As a folder written by another tool (PEFT): no checksums, so the content checks must catch it."""
    _edit_config(folder, lambda config: config[EXTRA_CONFIG_KEY].pop("sha256"))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)
    _without_checksums(folder)


def _drop_first_key(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[min(tensors)]


def _add_key(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.model.layers.0.mlp.nowhere.weight"] = torch.zeros(2, 2)


def _reshape_first(tensors: dict[str, torch.Tensor]) -> None:
    key = min(tensors)
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    noise = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (folder / WEIGHTS_NAME).write_bytes(noise.numpy().tobytes())


def _bad_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[9] = 0xFF  # the JSON header is no longer UTF-8
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))


def _flip_last_data_byte(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0x01  # a tensor value changes; the file still parses
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))


def _then_no_checksums(corrupt: Corruption) -> Corruption:
    def both(folder: Path) -> None:
        corrupt(folder)
        _without_checksums(folder)

    return both


def _bin_only(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS_NAME), folder / PICKLE_WEIGHTS_NAME)
    (folder / WEIGHTS_NAME).unlink()


def _no_weights(folder: Path) -> None:
    (folder / WEIGHTS_NAME).unlink()


def _bad_json(folder: Path) -> None:
    (folder / CONFIG_NAME).write_text('{"peft_type": "LORA", ')


def _gpt2_config(folder: Path) -> None:
    # the same method saved for another architecture: GPT-2's module names and widths
    peft_type = json.loads((folder / CONFIG_NAME).read_text())["peft_type"]
    ON_GPT2[METHOD_OF[peft_type]](build_model("gpt2")).save(folder)


def _wider(folder: Path) -> None:
    # same names, another model width: every tensor gets a wrong shape
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            tensors[key] = torch.zeros(*(2 * size if size > 2 else size for size in tensor.shape))

    _edit_tensors(folder, widen)


def _gpt2_peft_folder(folder: Path) -> None:
    # as a folder PEFT wrote for GPT-2: no model_type recorded, so keys and shapes must tell
    _gpt2_config(folder)
    _edit_config(folder, lambda config: config.pop(EXTRA_CONFIG_KEY))


def _other_peft_type(folder: Path) -> None:
    _edit_config(folder, lambda config: config.update(peft_type=OTHER_TYPE[config["peft_type"]]))


def _other_dims(folder: Path) -> None:
    _edit_config(folder, lambda config: config.update(OTHER_DIMS[config["peft_type"]]))


def _missing_extra(folder: Path) -> None:
    extra = folder / EXTRA_WEIGHTS_NAME
    if extra.is_file():
        extra.unlink()  # a method with an extra file: the file is really gone
    else:
        _edit_config(folder, lambda config: config[EXTRA_CONFIG_KEY].update(extra_file=True))


def _newer_format(folder: Path) -> None:
    _edit_config(folder, lambda config: config.setdefault(EXTRA_CONFIG_KEY, {}).update(format_version=2))


CORRUPTIONS: dict[str, tuple[Corruption, type[Exception] | tuple[type[Exception], ...], str]] = {
    "missing key": (lambda f: _edit_tensors(f, _drop_first_key), ValueError, r"does not fit .* missing keys \['"),
    "unexpected key": (
        lambda f: _edit_tensors(f, _add_key),
        ValueError,
        r"unexpected keys \['base_model.model.model.layers.0.mlp.nowhere",
    ),
    "wrong shape": (lambda f: _edit_tensors(f, _reshape_first), ValueError, r"has shape \("),
    "truncated file": (_truncate, CheckpointError, r"adapter_model.safetensors' does not match the SHA-256"),
    "flipped data byte": (_flip_last_data_byte, CheckpointError, r"does not match the SHA-256 recorded"),
    "truncated file, no checksum": (
        _then_no_checksums(_truncate),
        CheckpointError,
        r"adapter_model.safetensors' is not a valid safetensors file",
    ),
    "garbage bytes, no checksum": (
        _then_no_checksums(_garbage),
        CheckpointError,
        r"adapter_model.safetensors' is not a valid safetensors file",
    ),
    "bad header, no checksum": (_then_no_checksums(_bad_header), CheckpointError, r"is not a valid safetensors file"),
    "bin only": (_bin_only, CheckpointError, r"holds only adapter_model.bin, a pickle.*allow_pickle=True"),
    "no weights": (_no_weights, FileNotFoundError, r"has adapter_config.json but no adapter_model.safetensors"),
    "bad json": (_bad_json, CheckpointError, r"adapter_config.json' is not valid JSON"),
    "another architecture": (_gpt2_config, ValueError, r"was saved for a 'gpt2' model; this is a 'llama' model"),
    "another architecture, PEFT folder": (
        _gpt2_peft_folder,
        ValueError,
        r"target_modules=.*c_attn.* matches no module of LlamaForCausalLM|token_dim=32 but the model's attention",
    ),
    "wider model": (_wider, ValueError, r"has shape"),
    "another peft_type": (
        _other_peft_type,
        ValueError,
        r"does not fit .* missing keys|token_dim=16 but the input embeddings|prefix_projection=False, .* extra file holds",
    ),
    "wrong dims in config": (_other_dims, ValueError, r"has shape|missing keys"),
    "missing extra file": (_missing_extra, CheckpointError, r"lacks prefix_hooks_extra.safetensors"),
    "newer format": (_newer_format, ValueError, r"format_version=2"),
}


@pytest.fixture
def warm_llama() -> PreTrainedModel:
    model = build_model("llama")
    warm_up(model)
    return model


UNDETECTABLE = {("another architecture, PEFT folder", "p_tuning")}
"""A P-tuning prompt holds only ``(T, hidden)`` vectors: saved by PEFT (no architecture recorded)
for a GPT-2 of the same width, nothing in it tells it apart from a llama prompt (PEFT loads it too)."""


@pytest.mark.parametrize("method", list(ADAPTERS))
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_each_corruption_raises_and_leaves_the_model_untouched(
    warm_llama: PreTrainedModel, tmp_path: Path, method: str, corruption: str
) -> None:
    if (corruption, method) in UNDETECTABLE:
        ADAPTERS[method](build_model("llama")).save(tmp_path)
        CORRUPTIONS[corruption][0](tmp_path)
        assert load_adapter(warm_llama, tmp_path) is not None  # loads, as PEFT's loader would
        return
    ADAPTERS[method](build_model("llama")).save(tmp_path)
    corrupt, error, message = CORRUPTIONS[corruption]
    corrupt(tmp_path)
    before = snapshot(warm_llama)
    with pytest.raises(error, match=message):
        load_adapter(warm_llama, tmp_path)
    with pytest.raises(error, match=message):
        attach(warm_llama, tmp_path)
    assert_untouched(warm_llama, before)


def test_the_error_for_a_pickle_says_how_to_opt_in(tmp_path: Path) -> None:
    model = build_model("llama")
    ADAPTERS["lora"](model).save(tmp_path)
    _bin_only(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_adapter(model, tmp_path)
    assert "can run arbitrary code" in str(info.value)
    assert "allow_pickle=True" in str(info.value) and "weights_only=True" in str(info.value)


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_a_pickle_loads_with_allow_pickle(tmp_path: Path, method: str) -> None:
    model = build_model("llama")
    handle = ADAPTERS[method](model)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.add_(torch.randn(parameter.shape))
    handle.save(tmp_path)
    _bin_only(tmp_path)
    loaded = load_adapter(model, tmp_path, allow_pickle=True, trainable=True)  # the form that was saved
    for (name, ours), (_, theirs) in zip(handle.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    batch = random_batch(2, 5)
    with torch.no_grad(), handle:
        expected = model(**batch).logits
    with torch.no_grad(), loaded:
        assert torch.equal(model(**batch).logits, expected)


class _Payload:
    """An object whose unpickling would run code: weights_only=True must refuse it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickle code ran",))


def test_allow_pickle_still_refuses_code(tmp_path: Path, warm_llama: PreTrainedModel) -> None:
    ADAPTERS["lora"](build_model("llama")).save(tmp_path)
    torch.save({"payload": _Payload(), **load_file(tmp_path / WEIGHTS_NAME)}, tmp_path / PICKLE_WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    before = snapshot(warm_llama)
    with pytest.raises(CheckpointError, match=r"could not be loaded with torch.load\(weights_only=True\)"):
        load_adapter(warm_llama, tmp_path, allow_pickle=True)
    assert_untouched(warm_llama, before)
