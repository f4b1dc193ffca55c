"""PrefixTuningConfig (validation, ``to_dict``, position offset, resolution from the
model) and the PrefixEncoder it builds."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import PretrainedConfig, PreTrainedModel

from prefix_hooks import PeftType, PrefixEncoder, PrefixTuningConfig, TaskType, attach_prefix

NUM_VIRTUAL_TOKENS = 4
BSZ = 3
RESOLUTION_FAMILIES = ("llama", "qwen3", "gpt2", "gpt_neox")
POSITIVE_INT_FIELDS = ("token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size")
EXTRA_FIELDS = {"position_offset", "encoder_decoder_layout"}  # ours only; PEFT ignores them in adapter_config.json
TASK_TYPES = "SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION"

# (field, bad value, what the message must say is accepted)
BAD_FIELDS = [
    *[("num_virtual_tokens", value, "a positive int") for value in (0, -1, 2.0, True, "8", None)],
    *[(name, value, "a positive int or None") for name in POSITIVE_INT_FIELDS for value in (0, -4, 1.5, False, "16")],
    *[("num_transformer_submodules", value, "1, 2 or None") for value in (0, 3, "1")],
    *[(name, value, "a bool") for name in ("prefix_projection", "inference_mode") for value in (1, "yes", None)],
    *[("position_offset", value, "an int >= 0 or None") for value in (-1, 1.0, True)],
    *[("task_type", value, TASK_TYPES) for value in ("CAUSAL", "causal_lm", 3)],
    *[("peft_type", value, "'PREFIX_TUNING'") for value in ("LORA", "prefix_tuning", None)],
]

NOT_POSITIVE_INTS = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=False), st.booleans(), st.text(max_size=3), st.none()
)
VALID_CONFIGS = st.builds(
    PrefixTuningConfig,
    num_virtual_tokens=st.integers(1, 64),
    token_dim=st.none() | st.integers(1, 512),
    num_layers=st.none() | st.integers(1, 48),
    num_attention_heads=st.none() | st.integers(1, 32),
    num_transformer_submodules=st.sampled_from([None, 1, 2]),
    encoder_hidden_size=st.none() | st.integers(1, 512),
    prefix_projection=st.booleans(),
    inference_mode=st.booleans(),
    task_type=st.sampled_from([None, *TaskType, *(t.value for t in TaskType)]),
    position_offset=st.none() | st.integers(0, 128),
)


# --- validation --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value", "accepted"), BAD_FIELDS)
def test_bad_field_is_refused_by_name(name: str, value: object, accepted: str) -> None:
    fields: dict[str, Any] = {name: value}
    with pytest.raises(ValueError) as error:
        PrefixTuningConfig(**fields)
    message = str(error.value)
    assert f"{name}={value!r}" in message, message
    assert accepted in message, message


@given(name=st.sampled_from(POSITIVE_INT_FIELDS), value=NOT_POSITIVE_INTS)
def test_positive_int_fields_refuse_everything_else(name: str, value: object) -> None:
    fields: dict[str, Any] = {name: value}
    if value is None:  # None means "read it from the model"
        assert getattr(PrefixTuningConfig(**fields), name) is None
        return
    with pytest.raises(ValueError, match=f"^{name}="):
        PrefixTuningConfig(**fields)


def test_peft_enums_are_accepted_and_normalised() -> None:
    config = PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, peft_type=peft.PeftType.PREFIX_TUNING)
    assert config.task_type is TaskType.CAUSAL_LM
    assert config.peft_type is PeftType.PREFIX_TUNING
    assert PrefixTuningConfig(task_type="SEQ_CLS").task_type is TaskType.SEQ_CLS


# --- to_dict ---------------------------------------------------------------------------------
@given(config=VALID_CONFIGS)
def test_to_dict_is_plain_json_and_round_trips(config: PrefixTuningConfig) -> None:
    out = config.to_dict()
    assert list(out) == [f.name for f in dataclasses.fields(PrefixTuningConfig)]
    assert type(out["peft_type"]) is str and out["peft_type"] == "PREFIX_TUNING"
    assert out["task_type"] is None or type(out["task_type"]) is str
    assert json.loads(json.dumps(out)) == out
    assert PrefixTuningConfig(**out) == config


def test_to_dict_uses_peft_field_names_and_values() -> None:
    shared: dict[str, Any] = {
        "num_virtual_tokens": 5, "token_dim": 16, "num_layers": 2, "num_attention_heads": 2,
        "num_transformer_submodules": 1, "encoder_hidden_size": 8, "prefix_projection": True,
        "inference_mode": True, "task_type": "CAUSAL_LM",
    }
    ours = PrefixTuningConfig(**shared, position_offset=0).to_dict()
    theirs = peft.PrefixTuningConfig(**shared).to_dict()
    shared_keys = set(ours) - EXTRA_FIELDS
    assert set(ours) - set(theirs) == EXTRA_FIELDS
    assert {key: ours[key] for key in shared_keys} == {key: theirs[key] for key in shared_keys}


# --- position offset ---------------------------------------------------------------------------
@given(num_virtual_tokens=st.integers(1, 64), position_offset=st.none() | st.integers(0, 128))
def test_effective_position_offset(num_virtual_tokens: int, position_offset: int | None) -> None:
    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, position_offset=position_offset)
    expected = num_virtual_tokens if position_offset is None else position_offset
    assert config.effective_position_offset == expected


# --- resolution from the model -------------------------------------------------------------------
def expected_dims(config: PretrainedConfig) -> dict[str, int]:
    """Prefix dimensions read independently from the model config: keys are stored at the kv width."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "token_dim": kv_heads * head_dim,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": kv_heads,
        "encoder_hidden_size": kv_heads * head_dim,
        "num_transformer_submodules": 1,
    }


@pytest.mark.parametrize("family", RESOLUTION_FAMILIES)
def test_dimensions_are_resolved_from_the_model(make_model: Callable[..., PreTrainedModel], family: str) -> None:
    model = make_model(family)
    requested = PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    resolved = attach_prefix(model, requested).config
    expected = expected_dims(model.config)
    assert {key: getattr(resolved, key) for key in expected} == expected
    assert requested.token_dim is None and requested.num_layers is None  # the user's config is not mutated
    if family in ("llama", "qwen3"):  # grouped-query: the kv width, not the hidden size
        assert resolved.token_dim == model.model.layers[0].self_attn.k_proj.out_features
        assert resolved.num_attention_heads < model.config.num_attention_heads


@pytest.mark.parametrize("family", RESOLUTION_FAMILIES)
def test_resolution_agrees_with_peft(make_model: Callable[..., PreTrainedModel], family: str) -> None:
    ours = attach_prefix(make_model(family), PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)).config
    peft_model = peft.get_peft_model(
        make_model(family), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    )
    theirs = peft_model.peft_config["default"]
    for key in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize("family", RESOLUTION_FAMILIES)
def test_explicit_matching_dimensions_are_kept(make_model: Callable[..., PreTrainedModel], family: str) -> None:
    model = make_model(family)
    dims: dict[str, Any] = {**expected_dims(model.config), "encoder_hidden_size": 7}
    resolved = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, **dims)).config
    assert {key: getattr(resolved, key) for key in dims} == dims


# --- PrefixEncoder ----------------------------------------------------------------------------
def prefix_width(config: PrefixTuningConfig) -> int:
    """``L * 2 * token_dim``: the encoder's output width for a resolved config."""
    assert config.num_layers is not None and config.token_dim is not None
    return config.num_layers * 2 * config.token_dim


@pytest.fixture
def make_encoder() -> Callable[..., PrefixEncoder]:
    """Factory: ``make_encoder(num_virtual_tokens, token_dim, num_layers, hidden, projection, inference)``."""

    def make(num_virtual_tokens: int, token_dim: int, num_layers: int, encoder_hidden_size: int = 8,
             prefix_projection: bool = False, inference_mode: bool = False) -> PrefixEncoder:
        config = PrefixTuningConfig(
            num_virtual_tokens=num_virtual_tokens, token_dim=token_dim, num_layers=num_layers,
            encoder_hidden_size=encoder_hidden_size, prefix_projection=prefix_projection,
            inference_mode=inference_mode,
        )
        return PrefixEncoder(config)

    return make


@given(
    num_virtual_tokens=st.integers(1, 12),
    token_dim=st.integers(1, 24),
    num_layers=st.integers(1, 4),
    encoder_hidden_size=st.integers(1, 16),
    batch=st.integers(1, 4),
    prefix_projection=st.booleans(),
)
def test_encoder_output_shape_and_prefix(
    make_encoder: Callable[..., PrefixEncoder], num_virtual_tokens: int, token_dim: int, num_layers: int,
    encoder_hidden_size: int, batch: int, prefix_projection: bool,
) -> None:
    encoder = make_encoder(num_virtual_tokens, token_dim, num_layers, encoder_hidden_size, prefix_projection)
    indices = torch.arange(num_virtual_tokens)[None]  # (1, P)
    output = encoder(indices.expand(batch, -1))
    assert output.shape == (batch, num_virtual_tokens, num_layers * 2 * token_dim)
    torch.testing.assert_close(encoder.prefix(), encoder(indices)[0], rtol=0, atol=0)
    if prefix_projection:
        assert isinstance(encoder.transform[2], torch.nn.Linear)
        assert encoder.embedding.weight.shape == (num_virtual_tokens, token_dim)
    else:
        assert encoder.prefix() is encoder.embedding.weight  # the plain form makes no copy


def test_encoder_needs_a_resolved_config() -> None:
    with pytest.raises(ValueError, match="resolved config"):
        PrefixEncoder(PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inference_mode_builds_a_frozen_plain_embedding(
    make_model: Callable[..., PreTrainedModel], family: str
) -> None:
    model = make_model(family)
    config = PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=True, inference_mode=True)
    handle = attach_prefix(model, config)
    width = prefix_width(handle.config)
    shapes = {name: tuple(p.shape) for name, p in handle.named_parameters()}
    assert shapes == {"embedding.weight": (NUM_VIRTUAL_TOKENS, width)}
    assert not handle.encoder.prefix_projection
    assert [p.requires_grad for p in handle.parameters()] == [False]
    with handle:
        assert [p.requires_grad for p in handle.parameters()] == [False]
        assert handle.num_trainable_parameters() == 0
    assert [p.requires_grad for p in handle.parameters()] == [False]


def test_training_mode_with_projection_builds_a_trainable_mlp(make_model: Callable[..., PreTrainedModel]) -> None:
    model = make_model("llama")
    config = PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=True, encoder_hidden_size=6)
    handle = attach_prefix(model, config)
    token_dim = handle.config.token_dim
    width = prefix_width(handle.config)
    shapes = {name: tuple(p.shape) for name, p in handle.named_parameters()}
    assert shapes == {
        "embedding.weight": (NUM_VIRTUAL_TOKENS, token_dim),
        "transform.0.weight": (6, token_dim),
        "transform.0.bias": (6,),
        "transform.2.weight": (width, 6),
        "transform.2.bias": (width,),
    }
    assert all(p.requires_grad for p in handle.parameters())
    assert handle.encoder.prefix().shape == (NUM_VIRTUAL_TOKENS, width)


def test_projection_runs_once_without_grad_and_follows_parameter_changes(make_model: Callable[..., Any]) -> None:
    """Without grad the folded prefix is reused (one MLP run per generate), but an update
    of any parameter, in place or by optimizer, is seen at once."""
    model = make_model("llama")
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    encoder = handle.encoder
    calls = {"n": 0}
    encoder.transform.register_forward_hook(lambda *args: calls.__setitem__("n", calls["n"] + 1))
    with torch.no_grad():
        first = encoder.prefix()
        assert encoder.prefix() is first and calls["n"] == 1
        last_linear = encoder.transform[2]
        assert isinstance(last_linear, torch.nn.Linear)
        last_linear.bias.add_(1.0)  # in-place change bumps the version
        second = encoder.prefix()
    assert calls["n"] == 2
    torch.testing.assert_close(second, first + 1.0)
    with_grad = encoder.prefix()  # grad enabled and trainable: always fresh, with a graph
    assert with_grad.requires_grad and calls["n"] == 3
    torch.testing.assert_close(with_grad.detach(), second)


@pytest.mark.parametrize("name", ["base_model_name_or_path", "revision"])
def test_common_string_fields_are_checked_for_every_method(name: str) -> None:
    """``AdapterConfig``'s shared fields are validated when any method's config is built directly."""
    from prefix_hooks import IA3Config, LoraConfig, PromptEncoderConfig, PromptTuningConfig

    bad: dict[str, Any] = {name: 3}
    for config_type in (PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig, LoraConfig, IA3Config):
        with pytest.raises(ValueError, match=rf"{name}=3 is not accepted; expected a string or None"):
            config_type(**bad)
