"""Checkpoint core: the config base class and adapter_config.json, the codec registry, folder writes,
multi-adapter folders, path arguments of attach*/load_adapter, and hub resolution."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import socket
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import (
    IA3Attachment,
    IA3Config,
    LoraAttachment,
    LoraConfig,
    MultiAttachment,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach,
    attach_ia3,
    attach_lora,
)
from prefix_hooks.checkpoint import (
    EXTRA_CONFIG_KEY,
    SavedAdapter,
    codec_for_config,
    codec_for_peft_type,
    config_from_dict,
    load_adapter,
    register_codec,
    save_adapter,
)
from prefix_hooks.checkpoint import codec as codec_module
from prefix_hooks.checkpoint import folder as folder_module
from prefix_hooks.checkpoint.configs import CONFIG_CLASSES, FORMAT_VERSION, PEFT_FIELD_DEFAULTS, extra_field_names
from prefix_hooks.core.config import AdapterConfig, PeftType

LORA_TARGETS = ["q_proj", "v_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
IA3_FEEDFORWARD = ["down_proj"]

# One config per method with non-default values, written as PEFT would name them.
CONFIGS: dict[str, AdapterConfig] = {
    "prefix": PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16, position_offset=0, task_type="CAUSAL_LM"
    ),
    "prompt": PromptTuningConfig(num_virtual_tokens=4, keep_virtual_outputs=True, inference_mode=True),
    "p_tuning": PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="LSTM", encoder_dropout=0.1),
    "lora": LoraConfig(
        r=4, lora_alpha=16, target_modules=LORA_TARGETS, rank_pattern={"v_proj": 2}, base_model_name_or_path="tiny"
    ),
    "ia3": IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD, revision="main"),
}


def _peft_class(peft_type: PeftType) -> type:
    return peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(peft_type.value)]


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: _json_default(item) for key, item in dataclasses.asdict(value).items()}
    return value


def _logits(model: nn.Module, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(**random_batch(2, 6, seed=seed, left_pad=[0, 2])).logits


def _randomised(handle: Any, seed: int = 7) -> Any:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + 1.0)
    return handle


def _bits(handle: Any) -> list[tuple[tuple[int, ...], bytes]]:
    """Every parameter's shape and bytes, in order (names differ between adapter names)."""
    return [
        (tuple(p.shape), p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for p in handle.parameters()
    ]


# --- config base class ------------------------------------------------------------------


def test_every_config_inherits_the_base_with_keyword_only_common_fields() -> None:
    for cls in CONFIG_CLASSES.values():
        assert issubclass(cls, AdapterConfig)
        common = {f.name for f in dataclasses.fields(AdapterConfig)}
        assert all(f.kw_only for f in dataclasses.fields(cls) if f.name in common), cls
    # positional use of each method's own fields is unchanged
    assert PrefixTuningConfig(5, 16).token_dim == 16
    assert LoraConfig(4, 32, 0.1).lora_dropout == 0.1
    assert PromptTuningConfig(6).num_virtual_tokens == 6
    assert IA3Config(["q_proj"]).target_modules == {"q_proj"}
    assert LoraConfig(base_model_name_or_path="m", revision="v1").revision == "v1"
    assert PrefixTuningConfig(revision="v2").to_dict()["revision"] == "v2"


@pytest.mark.parametrize("method", list(CONFIGS))
def test_config_round_trips_through_dicts_and_files(method: str, tmp_path: Path) -> None:
    config = CONFIGS[method]
    cls = type(config)
    assert cls.from_dict(config.to_dict()) == config
    assert cls.from_dict(config.to_json_dict()) == config
    config.save_pretrained(tmp_path / "config")
    assert cls.from_pretrained(tmp_path / "config") == config
    assert AdapterConfig.from_pretrained(str(tmp_path / "config")) == config
    written = json.loads((tmp_path / "config" / "adapter_config.json").read_text())
    assert written == config.to_json_dict()
    assert written[EXTRA_CONFIG_KEY]["format_version"] == FORMAT_VERSION
    peft_keys = set(PEFT_FIELD_DEFAULTS[PeftType(config.peft_type)])
    assert set(written) - {EXTRA_CONFIG_KEY} <= peft_keys  # PEFT knows every top-level key
    assert set(written[EXTRA_CONFIG_KEY]) - {"format_version"} == set(extra_field_names(cls))


def test_our_fields_sit_under_the_extra_key() -> None:
    written = PrefixTuningConfig(num_virtual_tokens=3, position_offset=0).to_json_dict()
    assert "position_offset" not in written and "encoder_decoder_layout" not in written
    assert written[EXTRA_CONFIG_KEY]["position_offset"] == 0
    assert PromptTuningConfig(keep_virtual_outputs=True).to_json_dict()[EXTRA_CONFIG_KEY]["keep_virtual_outputs"]
    assert extra_field_names(LoraConfig) == () and extra_field_names(IA3Config) == ()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_peft_reads_our_config_files(method: str, tmp_path: Path) -> None:
    """PEFT 0.21 drops the unknown "prefix_hooks" key (with a warning) and reads every other key."""
    config = CONFIGS[method]
    config.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(theirs) is _peft_class(PeftType(config.peft_type))
    for key, value in config.to_json_dict().items():
        if key != EXTRA_CONFIG_KEY:
            assert _json_default(getattr(theirs, key)) == value, key


@pytest.mark.parametrize("peft_type", list(CONFIG_CLASSES))
def test_peft_key_table_matches_installed_peft(peft_type: PeftType) -> None:
    fields = {f.name: f for f in dataclasses.fields(_peft_class(peft_type)) if f.init}
    defaults = {
        name: _json_default(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for name, f in fields.items()
    }
    assert PEFT_FIELD_DEFAULTS[peft_type] == defaults


@pytest.mark.parametrize("method", list(CONFIGS))
def test_configs_saved_by_peft_load_silently(method: str, tmp_path: Path) -> None:
    ours = CONFIGS[method]
    fields = {k: v for k, v in ours.to_json_dict().items() if k not in (EXTRA_CONFIG_KEY, "peft_type")}
    theirs = _peft_class(PeftType(ours.peft_type))(**fields)
    theirs.save_pretrained(str(tmp_path))  # writes every PEFT key at its default, peft_version, ...
    loaded = AdapterConfig.from_pretrained(tmp_path)  # filterwarnings=error: no warning allowed
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ours)}
    if "virtual_token_placement" in defaults:
        defaults["virtual_token_placement"] = "peft"  # a prompt PEFT trained keeps PEFT's layout
    expected = dataclasses.replace(ours, **{name: defaults[name] for name in extra_field_names(type(ours))})
    assert loaded == expected


def test_unknown_keys_warn_naming_them() -> None:
    data = {**LoraConfig(r=2).to_json_dict(), "shiny_new_option": 3, "other": None}
    with pytest.warns(UserWarning, match=r"\['other', 'shiny_new_option'\]"):
        config = config_from_dict(data)
    assert config == LoraConfig(r=2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"peft_type": "LORA", "r": "8"}, r"r='8' has the wrong type; expected an int"),
        ({"peft_type": "LORA", "r": 8.0}, r"r=8.0 has the wrong type"),
        ({"peft_type": "LORA", "target_modules": [1, 2]}, r"target_modules=\[1, 2\] has the wrong type"),
        ({"peft_type": "LORA", "rank_pattern": {"q": "2"}}, r"rank_pattern=\{'q': '2'\} has the wrong type"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2.5}, r"num_virtual_tokens=2.5 has the wrong type"),
        ({"peft_type": "PREFIX_TUNING", "prefix_projection": "yes"}, r"prefix_projection='yes'"),
        ({"peft_type": "PROMPT_TUNING", "task_type": 5}, r"task_type=5 has the wrong type"),
        ({"peft_type": "PROMPT_TUNING", "task_type": "TRANSLATE"}, r"task_type='TRANSLATE' is not accepted"),
        ({"peft_type": "IA3", "inference_mode": 1}, r"inference_mode=1 has the wrong type; expected true/false"),
        ({"peft_type": "IA3", "revision": 3}, r"revision=3 has the wrong type"),
        ({"peft_type": "LORA", "use_qalora": True}, r"use_qalora=True \(PEFT's default: False\)"),
        ({"peft_type": "LORA", "lora_bias": True, "r": 4}, r"PEFT options that prefix_hooks does not implement"),
        ({"peft_type": "BOFT"}, r"peft_type='BOFT' is not supported; supported: 'PREFIX_TUNING'"),
        ({"r": 8}, r"has no 'peft_type'"),
        ({"peft_type": "LORA", EXTRA_CONFIG_KEY: {"format_version": 99}}, r"format_version=99; this version reads"),
        ({"peft_type": "LORA", EXTRA_CONFIG_KEY: []}, r"expected a JSON object"),
        (
            {"peft_type": "PREFIX_TUNING", "position_offset": 1, EXTRA_CONFIG_KEY: {"position_offset": 2}},
            r"position_offset is given twice",
        ),
    ],
)
def test_bad_config_dicts_raise_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_from_pretrained_refuses_another_method(tmp_path: Path) -> None:
    LoraConfig(r=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LoraConfig \(peft_type='LORA'\), not a PrefixTuningConfig"):
        PrefixTuningConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a IA3Config"):
        IA3Config.from_dict(LoraConfig(r=2).to_dict())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraConfig.from_pretrained(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


# --- codec registry ---------------------------------------------------------------------


def test_codec_lookup_errors_list_what_is_supported() -> None:
    with pytest.raises(ValueError, match=r"peft_type='LOHA' is not supported; supported: .*'IA3'.*'LORA'"):
        codec_for_peft_type("LOHA")
    with pytest.raises(TypeError, match=r"cannot save or load a object; supported configs: .*LoraConfig"):
        codec_for_config(object())
    with pytest.raises(TypeError, match="does not implement the Codec protocol"):
        register_codec(object())  # type: ignore[arg-type]
    assert codec_for_peft_type("LORA") is codec_for_config(LoraConfig())
    assert codec_for_peft_type("IA3") is codec_for_config(IA3Config())


def test_a_later_codec_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shadow:
        config_types: tuple[type, ...] = (LoraConfig,)
        peft_types: tuple[str, ...] = ("LORA",)

        def save(self, handle: Any) -> SavedAdapter:
            raise NotImplementedError

        def load(self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool) -> Any:
            raise NotImplementedError

    codec_module.registered_codecs()  # built-ins first
    monkeypatch.setattr(codec_module, "_codecs", list(codec_module._codecs))
    shadow = Shadow()
    register_codec(shadow)
    assert codec_for_peft_type("LORA") is shadow and codec_for_config(LoraConfig()) is shadow


# --- save / load through the api --------------------------------------------------------


def _lora(model: nn.Module, name: str = "default") -> LoraAttachment:
    return _randomised(attach_lora(model, LoraConfig(r=2, target_modules=LORA_TARGETS), name))


def _ia3(model: nn.Module, name: str = "default") -> IA3Attachment:
    config = IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD)
    return _randomised(attach_ia3(model, config, name))


def test_handle_save_and_path_arguments_round_trip_bitwise(tmp_path: Path) -> None:
    model = build_model("llama")
    handle = _lora(model)
    with handle:
        expected = _logits(model)
    handle.save(tmp_path / "lora")
    save_adapter(handle, str(tmp_path / "lora2"))
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for loaded in (
        load_adapter(model, tmp_path / "lora"),
        attach_lora(model, str(tmp_path / "lora2")),
        attach(model, tmp_path / "lora"),
    ):
        assert not loaded.is_attached
        if not isinstance(loaded, MultiAttachment):
            assert _bits(loaded) == _bits(handle)
        with loaded:
            assert torch.equal(_logits(model), expected)
    with pytest.raises(ValueError, match=r"holds a LoraAttachment adapter, not a IA3Attachment"):
        attach_ia3(model, tmp_path / "lora")


def test_load_adapter_names_and_trainable_form(tmp_path: Path) -> None:
    model = build_model("llama")
    _lora(model).save(tmp_path)
    frozen = load_adapter(model, tmp_path, "mine")
    assert frozen.adapter_name == "mine"
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(model, tmp_path, trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError, match=r"adapter_name='no good' is not accepted"):
        load_adapter(model, tmp_path, "no good")


@pytest.mark.parametrize("distinct_names", [True, False])
def test_several_adapters_save_to_subfolders(tmp_path: Path, distinct_names: bool) -> None:
    model = build_model("llama")
    names = ("first", "second") if distinct_names else ("default", "default")
    lora, ia3 = _lora(model, names[0]), _ia3(model, names[1])
    with attach(model, lora, ia3) as both:
        expected = _logits(model)
    both.save(tmp_path / "both")
    subfolders = list(names) if distinct_names else ["lora", "ia3"]
    index = json.loads((tmp_path / "both" / "prefix_hooks_adapters.json").read_text())
    assert index["adapters"] == subfolders
    loaded = attach(model, tmp_path / "both")
    assert [type(p) for p in loaded.parts] == [LoraAttachment, IA3Attachment]
    assert [p.adapter_name for p in loaded.parts] == list(names)
    with loaded:
        assert torch.equal(_logits(model), expected)
    # each subfolder is a PEFT adapter folder of its own
    alone = load_adapter(model, tmp_path / "both", subfolder=subfolders[1])
    assert isinstance(alone, IA3Attachment) and _bits(alone) == _bits(ia3)
    peft_model = peft.PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "both"), subfolder=subfolders[0])
    with lora:
        torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-5)


def test_two_parts_of_one_method_with_one_name_are_refused(tmp_path: Path) -> None:
    model = build_model("llama")
    first = _lora(model)
    second = attach_lora(model, LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="two parts of the same method share a name"):
        save_adapter(MultiAttachment(model, [first, second]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- atomic writes ----------------------------------------------------------------------


def test_a_crash_mid_save_leaves_the_old_folder_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("llama")
    old = _lora(model)
    old.save(tmp_path / "adapter")
    new = _randomised(attach_lora(model, LoraConfig(r=2, target_modules=LORA_TARGETS)), seed=9)
    calls = {"n": 0}
    real_fsync = os.fsync

    def crash_on_second_file(descriptor: int) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:  # the first file is written, the second is not
            raise OSError("disk full")
        real_fsync(descriptor)

    monkeypatch.setattr(folder_module.os, "fsync", crash_on_second_file)
    for target in ("adapter", "fresh"):
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            new.save(tmp_path / target)
    monkeypatch.undo()
    assert _bits(load_adapter(model, tmp_path / "adapter")) == _bits(old)  # the old folder, intact
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left behind
    new.save(tmp_path / "adapter")  # replacing works once the disk is back
    assert _bits(load_adapter(model, tmp_path / "adapter")) == _bits(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saving_into_a_folder_with_other_files_keeps_them(tmp_path: Path) -> None:
    model = build_model("llama")
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"stale pickle")
    handle = _lora(model)
    handle.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
    assert _bits(load_adapter(model, tmp_path)) == _bits(handle)


def test_save_refuses_a_file_target(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _lora(build_model("llama")).save(tmp_path / "file")


# --- hub resolution ---------------------------------------------------------------------


def test_hub_ids_are_fetched_with_revision_and_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    model = build_model("llama")
    handle = _lora(model)
    handle.save(tmp_path / "snapshot" / "sub")
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tmp_path / "snapshot")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_adapter(model, "someone/tiny-lora", revision="v1", subfolder="sub")
    assert _bits(loaded) == _bits(handle)
    assert calls == [
        {
            "repo_id": "someone/tiny-lora",
            "revision": "v1",
            "allow_patterns": ["sub/*.json", "sub/*.safetensors"],
            "local_files_only": False,
        }
    ]


def test_offline_mode_gives_a_clear_error_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def no_network(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)  # recorded: huggingface_hub may swallow the error below
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub read its constants:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # we must read the environment
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # a look-up is an attempt too
    with pytest.raises(
        FileNotFoundError, match=r"'someone/adapter' is not a local folder, and hub downloads are disabled"
    ):
        load_adapter(build_model("llama"), "someone/adapter")
    assert attempts == []


def test_a_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a local folder, nor a valid Hugging Face Hub repository id"):
        load_adapter(build_model("llama"), tmp_path / "does" / "not" / "exist")
    with pytest.raises(TypeError, match="expected a folder path or hub repository id"):
        load_adapter(build_model("llama"), 3)  # type: ignore[arg-type]
