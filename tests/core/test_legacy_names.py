"""Module names from before transformers 5 (ViT's ``query``/``value``, ``encoder.layer.N``) in
LoRA / IA3 configs and in PEFT checkpoints written on transformers 4.

Oracles independent of the renaming code: PEFT on the same tensors under the current names
(a folder whose keys and config were renamed by hand), selection by the current names, and
transformers' own loading direction (every legacy name we derive must load into its module).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import tiny_encoders
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.core_model_loading import WeightRenaming

from prefix_hooks import IA3Config, LoraConfig, attach, attach_ia3, attach_lora
from prefix_hooks.core import legacy_names
from prefix_hooks.core.legacy_names import current_keys, legacy_module_names
from prefix_hooks.ia3 import select_targets as ia3_targets
from prefix_hooks.ia3.attachment import IA3Attachment
from prefix_hooks.lora import select_targets as lora_targets
from prefix_hooks.lora.attachment import LoraAttachment

LAYERS = 2
HIDDEN = 32
PREFIX = "base_model.model."


def vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4,
    )
    config.num_labels = 3
    return ViTForImageClassification(config).eval()


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels()).logits  # (B, num_labels)


def legacy(layer: int, leaf: str) -> str:
    """A transformers-4 ViT module name, e.g. ``vit.encoder.layer.0.attention.attention.query``."""
    return f"vit.encoder.layer.{layer}.{leaf}"


CURRENT = {  # transformers-4 leaf -> transformers-5 leaf of a ViT layer
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def current(layer: int, leaf: str) -> str:
    return f"vit.layers.{layer}.{CURRENT[leaf]}"


def test_legacy_names_are_transformers_4_names_that_load_back(tmp_path: Path) -> None:
    model = vit()
    names = legacy_module_names(model)
    for layer in range(LAYERS):
        for old, new in CURRENT.items():
            assert names[f"vit.layers.{layer}.{new}"] == legacy(layer, old)
    # transformers' own loader: a checkpoint keyed by our legacy names loads every tensor in place
    state = model.state_dict()
    legacy_state = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        legacy_state[f"{names.get(module, module)}.{leaf}"] = tensor.clone()
    assert sum(key.startswith("vit.encoder.layer.") for key in legacy_state) == sum(
        key.startswith("vit.layers.") for key in state
    )
    model.config.save_pretrained(tmp_path)
    save_file(legacy_state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = ViTForImageClassification.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[key], tensor) for key, tensor in state.items())


@pytest.mark.parametrize(
    "model",
    [
        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=40)),
        BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=40)),
    ],
    ids=["llama", "bert"],
)
def test_families_transformers_did_not_rename_have_no_legacy_names(model: torch.nn.Module) -> None:
    assert legacy_module_names(model) == {}
    assert current_keys(model, {"a": 1}, {"b"}) == {"a": 1}


def test_lora_old_names_select_the_renamed_modules_and_layer_filters_still_apply() -> None:
    model = vit()
    old = lora_targets(model, LoraConfig(target_modules=["query", "value"]))
    assert old == lora_targets(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert old == [current(layer, leaf) for layer in range(LAYERS)
                   for leaf in ("attention.attention.query", "attention.attention.value")]
    in_layer_1 = LoraConfig(target_modules=["query"], layers_to_transform=[1], layers_pattern="layer")
    assert lora_targets(model, in_layer_1) == [current(1, "attention.attention.query")]
    excluded = LoraConfig(target_modules=["query", "value"], exclude_modules=["value"])
    assert lora_targets(model, excluded) == [current(layer, "attention.attention.query") for layer in range(LAYERS)]
    assert lora_targets(model, LoraConfig(target_modules=r".*encoder\.layer\.0\.attention\.attention\.query")) == [
        current(0, "attention.attention.query")
    ]
    with pytest.raises(ValueError, match=r"target_modules=\['querry'\] matches no module"):
        lora_targets(model, LoraConfig(target_modules=["querry"]))
    with pytest.raises(ValueError, match="matches no module"):
        lora_targets(model, LoraConfig(target_modules=["query", "value"]), legacy_names=False)


def test_ia3_old_names_select_targets_and_feedforward_modules() -> None:
    model = vit()
    config = IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    selected = [(target.name, target.feedforward) for target in ia3_targets(model, config)]
    expected = [
        (current(layer, leaf), leaf.endswith("output.dense"))
        for layer in range(LAYERS)
        for leaf in ("attention.attention.key", "attention.attention.value", "attention.output.dense", "output.dense")
    ]
    assert selected == expected  # PEFT's plain suffix rule: "output.dense" is also the attention output


def _randomise(handle: LoraAttachment | IA3Attachment) -> None:
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)


def _rename_folder(source: Path, target: Path, keys: dict[str, str], config: dict[str, object]) -> None:
    """A copy of the adapter folder ``source`` with keys renamed by ``keys`` and the config updated."""
    target.mkdir()
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({keys.get(key, key): tensor for key, tensor in tensors.items()}, target / "adapter_model.safetensors")
    saved = json.loads((source / "adapter_config.json").read_text())
    saved.pop("prefix_hooks")  # our extras (checksums among them): the folder is as PEFT writes it
    (target / "adapter_config.json").write_text(json.dumps({**saved, **config}))


def _legacy_key_map(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Current PEFT keys -> the keys PEFT wrote for the same module on transformers 4."""
    out = {}
    for key in tensors:
        for layer in range(LAYERS):
            for old, new in CURRENT.items():
                module = f"{PREFIX}vit.layers.{layer}.{new}."
                if key.startswith(module):
                    out[key] = f"{PREFIX}{legacy(layer, old)}.{key[len(module):]}"
    return out


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_transformers_4_checkpoint_loads_as_peft_loads_its_renamed_copy(tmp_path: Path, method: str) -> None:
    """A folder in the layout PEFT wrote on transformers 4 (old keys, old target names) loads here;
    PEFT 0.21 cannot load it, so the oracle is PEFT on a copy renamed by hand to the new names."""
    model = vit()
    handle: LoraAttachment | IA3Attachment
    if method == "lora":
        new_config: dict[str, object] = {"target_modules": ["q_proj", "v_proj"]}
        old_config: dict[str, object] = {"target_modules": ["query", "value"]}
        handle = attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    else:
        new_config = {"target_modules": ["k_proj", "fc2"], "feedforward_modules": ["fc2"]}
        # the old suffix "output.dense" would also name the attention output: old full names instead
        old_config = {
            "target_modules": [legacy(i, leaf) for i in range(LAYERS) for leaf in ("attention.attention.key", "output.dense")],
            "feedforward_modules": [legacy(i, "output.dense") for i in range(LAYERS)],
        }
        handle = attach_ia3(model, IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]))
    _randomise(handle)
    handle.save(tmp_path / "current")
    tensors = load_file(tmp_path / "current" / "adapter_model.safetensors")
    keys = _legacy_key_map(tensors)
    assert len(keys) == len(tensors) > 0
    _rename_folder(tmp_path / "current", tmp_path / "legacy", keys, old_config)
    _rename_folder(tmp_path / "current", tmp_path / "oracle", {}, new_config)

    base = logits(model)
    with attach(model, tmp_path / "legacy"):
        ours = logits(model)
    theirs = logits(peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "oracle"))
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.equal(logits(model), base)


def test_a_folder_with_both_old_and_new_keys_is_refused(tmp_path: Path) -> None:
    model = vit()
    handle = attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    handle.save(tmp_path / "current")
    tensors = load_file(tmp_path / "current" / "adapter_model.safetensors")
    doubled = {**tensors, **{old: tensors[new].clone() for new, old in _legacy_key_map(tensors).items()}}
    _rename_folder(tmp_path / "current", tmp_path / "both", {}, {})
    save_file(doubled, tmp_path / "both" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.attention\.query"):
        attach(model, tmp_path / "both")


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_old_target_names_save_a_folder_peft_selects_the_same_modules_from(tmp_path: Path, method: str) -> None:
    model = vit()
    handle: LoraAttachment | IA3Attachment
    if method == "lora":
        handle = attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
        field_names = ["target_modules"]
    else:
        handle = attach_ia3(model, IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]))
        field_names = ["target_modules", "feedforward_modules"]
    _randomise(handle)
    with handle:
        ours = logits(model)
        handle.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for field in field_names:  # named in full under the current names, which PEFT matches
        assert saved[field] and all(name.startswith("vit.layers.") for name in saved[field]), saved[field]
    theirs = logits(peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter"))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    with attach(model, tmp_path / "adapter"):
        assert torch.equal(logits(model), ours)


def test_current_names_save_the_config_as_given(tmp_path: Path) -> None:
    model = vit()
    with attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])) as handle:
        handle.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


def test_a_backward_name_that_would_load_elsewhere_is_not_a_legacy_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chained renamings alpha -> beta -> gamma: an old ``alpha`` loads into ``gamma``, so ``beta``
    has no old name even though running the renamings backwards turns it into ``alpha``."""
    renamings = [WeightRenaming("alpha", "beta"), WeightRenaming("beta", "gamma")]
    monkeypatch.setattr(legacy_names, "_renamings", lambda model: renamings)
    model = torch.nn.Module()
    model.blk = torch.nn.ModuleDict({"beta": torch.nn.Linear(2, 2), "gamma": torch.nn.Linear(2, 2)})
    assert legacy_module_names(model) == {"blk.gamma": "blk.alpha"}


def test_a_transformers_4_llava_lora_folder_loads(tmp_path: Path) -> None:
    """LLaVA moved its text model: ``language_model.model.layers`` (4.x) is ``model.language_model.layers``."""
    model = tiny_encoders.build("llava")
    handle = attach_lora(model, LoraConfig(r=4, lora_alpha=8))  # the family default: the text tower's q/v
    _randomise(handle)
    handle.save(tmp_path / "current")
    tensors = load_file(tmp_path / "current" / "adapter_model.safetensors")
    new, old = f"{PREFIX}model.language_model.", f"{PREFIX}language_model.model."
    keys = {key: old + key[len(new) :] for key in tensors if key.startswith(new)}
    assert len(keys) == len(tensors) > 0
    _rename_folder(tmp_path / "current", tmp_path / "legacy", keys, {})
    inputs = tiny_encoders.example_inputs("llava")
    with torch.no_grad():
        base = model(**inputs).logits
        with attach(model, tmp_path / "current"):
            expected = model(**inputs).logits
        with attach(model, tmp_path / "legacy"):
            ours = model(**inputs).logits
    assert (expected - base).abs().max() > 1e-3
    assert torch.equal(ours, expected)
