"""LoraConfig: validation, PEFT's defaults and ``to_dict`` keys, rank/alpha patterns and scaling
(checked against the ranks and scalings PEFT gives the layers it builds)."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import warnings
from typing import Any

import peft
import pytest
from hypothesis import given
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key
from tiny_models import build_model
from torch import nn

from prefix_hooks.core.config import TaskType
from prefix_hooks.lora import LoraConfig

RANK = 8
ALPHA = 16
TASK_TYPES = "SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION"
NAMES_ACCEPTED = "a list of module names"

# (field, bad value, other fields, what the message must say is accepted)
BAD_FIELDS: list[tuple[str, object, dict[str, Any], str]] = [
    *[("r", value, {}, "a positive int") for value in (0, -1, 2.0, True, "8", None)],
    *[("lora_alpha", value, {}, "a positive number") for value in (0, -1, -0.5, True, "8", None, math.nan, math.inf)],
    *[("lora_dropout", value, {}, "0 <= p < 1") for value in (-0.1, 1.0, 1, 1.5, True, "0.1", None)],
    *[("target_modules", value, {}, NAMES_ACCEPTED) for value in (3, [""], ["q_proj", 3], ("q", None), {"q": 1})],
    ("target_modules", [], {}, "selects no module"),
    ("target_modules", "", {}, "a non-empty regular expression"),
    *[("target_modules", value, {}, "not a valid regular expression") for value in ("(", "q_proj[", "*")],
    *[("exclude_modules", value, {}, NAMES_ACCEPTED) for value in (5, [""], [None])],
    *[("exclude_modules", value, {}, "not a valid regular expression") for value in ("(", "[a-")],
    ("exclude_modules", "all-linear", {}, "target_modules shorthand"),
    *[("layers_to_transform", value, {}, "a layer index >= 0") for value in (-1, [0, -1], "0", 1.5, True, [True], [0.0])],
    *[
        ("layers_pattern", value, {"layers_to_transform": [0]}, "the name (regex) of the layer container")
        for value in ("", 3, ["layers", ""], [3], {"layers"})
    ],
    ("layers_pattern", "(", {"layers_to_transform": [0]}, "not a valid regular expression"),
    *[("rank_pattern", value, {}, "positive ints") for value in (["q"], None, "q_proj")],
    *[("alpha_pattern", value, {}, "positive numbers") for value in (["q"], None)],
    *[(name, value, {}, "expected True or False") for name in ("use_rslora", "fan_in_fan_out", "inference_mode")
      for value in (1, "yes", None)],
    *[("init_lora_weights", value, {}, "expected True") for value in ("pissa", "olora", "loftq", "Gaussian", 1, 0.0, None)],
    *[("bias", value, {}, "none, all, lora_only") for value in ("None", "some", None, True)],
    *[("modules_to_save", value, {}, NAMES_ACCEPTED) for value in ("classifier", [""], [3], 5)],
    *[("task_type", value, {}, TASK_TYPES) for value in ("CAUSAL", "causal_lm", 3)],
    *[("peft_type", value, {}, "'LORA'") for value in ("PREFIX_TUNING", "lora", None)],
    ("base_model_name_or_path", 3, {}, "a string or None"),
    ("revision", 1.0, {}, "a string or None"),
]
# (fields, what the message must name, what it must say)
BAD_PATTERN_ENTRIES: list[tuple[dict[str, Any], str, str]] = [
    *[({"rank_pattern": {"q_proj": value}}, f"rank_pattern['q_proj']={value!r}", "positive ints")
      for value in (0, -2, 1.5, True, "4")],
    *[({"alpha_pattern": {"q_proj": value}}, f"alpha_pattern['q_proj']={value!r}", "positive numbers")
      for value in (0, -1.0, False, "8", math.inf)],
    ({"rank_pattern": {"(": 2}}, "rank_pattern key='('", "not a valid regular expression"),
    ({"rank_pattern": {"": 2}}, "rank_pattern key ''", "a non-empty module-name regex"),
    ({"alpha_pattern": {"v_pro[j": 2}}, "alpha_pattern key='v_pro[j'", "not a valid regular expression"),
]
BAD_COMBINATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform=[0]", "a list of names"),
    ({"target_modules": "all-linear", "layers_to_transform": 1}, "layers_to_transform=1", "a list of names"),
    ({"target_modules": ".*q", "layers_to_transform": [0], "layers_pattern": "layers"}, "'.*q'", "a list of names"),
    ({"target_modules": ["q"], "layers_pattern": "layers"}, "layers_pattern='layers'", "set both"),
]

PEFT_ONLY_MODULE_NAMES = st.sampled_from(["q_proj", "v_proj", "self_attn.q_proj", "mlp.down_proj", "c_attn"])
VALID_CONFIGS = st.builds(
    LoraConfig,
    r=st.integers(1, 64),
    lora_alpha=st.integers(1, 64) | st.floats(0.125, 64.0),
    lora_dropout=st.sampled_from([0.0, 0.05, 0.5]),
    target_modules=st.none() | st.just("all-linear") | st.just(r".*\.q_proj")
    | st.lists(PEFT_ONLY_MODULE_NAMES, min_size=1, max_size=3),
    exclude_modules=st.none() | st.just(r".*layers\.0\..*") | st.lists(PEFT_ONLY_MODULE_NAMES, max_size=2),
    rank_pattern=st.dictionaries(PEFT_ONLY_MODULE_NAMES, st.integers(1, 32), max_size=2),
    alpha_pattern=st.dictionaries(PEFT_ONLY_MODULE_NAMES, st.integers(1, 32), max_size=2),
    use_rslora=st.booleans(),
    init_lora_weights=st.sampled_from([True, False, "gaussian"]),
    fan_in_fan_out=st.booleans(),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    modules_to_save=st.none() | st.lists(st.sampled_from(["classifier", "score", "lm_head"]), max_size=2, unique=True),
    task_type=st.sampled_from([None, *TaskType, *(t.value for t in TaskType)]),
    inference_mode=st.booleans(),
    base_model_name_or_path=st.none() | st.just("tiny/llama"),
    revision=st.none() | st.just("main"),
)

# rank_pattern / alpha_pattern sets checked against PEFT (dict order matters: the first match wins)
PATTERNS: list[tuple[dict[str, int], dict[str, float]]] = [
    ({"q_proj": 4}, {"v_proj": 32}),
    ({r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6}, {"self_attn.k_proj": 3.5}),
    ({"proj": 5, ".*_proj": 7}, {"proj": 1, "mlp.up_proj": 2}),  # "proj" alone matches no name's end
    ({"q_proj": 9, r".*\.q_proj": 1}, {r".*\.q_proj": 5, "q_proj": 50}),
    ({r"model\.layers\.0\.mlp\..*": 3}, {r"layers\.\d\.mlp\.(gate|up)_proj": 12}),
]


def _plain(value: Any) -> Any:
    """A config value as it appears in adapter_config.json (sets sorted, enums as strings)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _peft_dict(**fields: Any) -> dict[str, Any]:
    return {key: _plain(value) for key, value in peft.LoraConfig(**fields).to_dict().items()}


# --- validation --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value", "others", "accepted"), BAD_FIELDS)
def test_bad_field_is_refused_by_name(name: str, value: object, others: dict[str, Any], accepted: str) -> None:
    with pytest.raises(ValueError) as error:
        LoraConfig(**{name: value, **others})
    message = str(error.value)
    assert f"{name}={value!r}" in message, message
    assert accepted in message, message


@pytest.mark.parametrize(("fields", "named", "accepted"), BAD_PATTERN_ENTRIES + BAD_COMBINATIONS)
def test_bad_entry_or_combination_is_refused_by_name(fields: dict[str, Any], named: str, accepted: str) -> None:
    with pytest.raises(ValueError) as error:
        LoraConfig(**fields)
    message = str(error.value)
    assert named in message, message
    assert accepted in message, message


@pytest.mark.parametrize(("fields", "named", "accepted"), BAD_COMBINATIONS)
def test_peft_refuses_the_same_combinations(fields: dict[str, Any], named: str, accepted: str) -> None:
    with pytest.raises(ValueError):
        peft.LoraConfig(**fields)


def test_accepted_values_are_normalised() -> None:
    config = LoraConfig(
        target_modules=["v_proj", "q_proj", "q_proj"], exclude_modules=("o_proj",), layers_to_transform=(0, 2),
        layers_pattern=("layers",), modules_to_save=["score", "classifier", "score"], task_type="SEQ_CLS",
        lora_alpha=0.5, init_lora_weights="gaussian",
    )
    assert config.target_modules == {"q_proj", "v_proj"}  # PEFT stores a list as a set
    assert config.exclude_modules == {"o_proj"}
    assert config.layers_to_transform == [0, 2]
    assert config.layers_pattern == ["layers"]
    assert config.modules_to_save == ["score", "classifier"]  # the user's order, duplicates dropped
    assert config.task_type is TaskType.SEQ_CLS
    assert LoraConfig(target_modules="ALL-Linear").target_modules == "ALL-Linear"  # case-insensitive, as PEFT
    assert LoraConfig(task_type=peft.TaskType.CAUSAL_LM).task_type is TaskType.CAUSAL_LM
    assert LoraConfig(layers_to_transform=3, target_modules=["q"]).layers_to_transform == 3


# --- PEFT's defaults and key names -----------------------------------------------------------------
def test_defaults_equal_peft() -> None:
    ours, theirs = LoraConfig(), peft.LoraConfig()
    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    for f in dataclasses.fields(LoraConfig):
        assert f.name in peft_fields, f"{f.name} is not a PEFT LoraConfig field"
        assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_to_dict_keys_and_default_values_equal_peft() -> None:
    ours = LoraConfig().to_dict()
    theirs = _peft_dict()
    assert list(ours) == [f.name for f in dataclasses.fields(LoraConfig)]
    assert set(ours) <= set(theirs)
    assert ours == {key: theirs[key] for key in ours}


@given(config=VALID_CONFIGS)
def test_to_dict_is_json_round_trips_and_peft_reads_it_alike(config: LoraConfig) -> None:
    out = config.to_dict()
    assert json.loads(json.dumps(out)) == out
    assert LoraConfig(**out) == config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes about unrelated options
        theirs = _peft_dict(**out)
    assert out == {key: theirs[key] for key in out}


# --- rank / alpha patterns and scaling -------------------------------------------------------------
def _peft_lora_layers(model: nn.Module, **fields: Any) -> dict[str, Any]:
    """PEFT's LoRA layers on ``model`` by qualified name (the oracle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**fields))
    inner = wrapped.base_model.model
    assert isinstance(inner, nn.Module)
    return {name: module for name, module in inner.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(("rank_pattern", "alpha_pattern"), PATTERNS)
def test_rank_alpha_and_scaling_equal_peft(
    rank_pattern: dict[str, int], alpha_pattern: dict[str, float], use_rslora: bool
) -> None:
    fields: dict[str, Any] = {
        "r": RANK, "lora_alpha": ALPHA, "target_modules": "all-linear", "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_rslora": use_rslora,
    }
    config = LoraConfig(**fields)
    layers = _peft_lora_layers(build_model("llama"), **fields)
    assert len(layers) == 14  # 7 linears x 2 layers
    overridden = 0
    for name, layer in layers.items():
        rank, alpha = config.rank_and_alpha(name)
        assert (rank, alpha) == (layer.r["default"], layer.lora_alpha["default"]), name
        assert config.scaling(name) == layer.scaling["default"], name
        expected = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        assert config.scaling(name) == expected
        overridden += (rank, alpha) != (RANK, ALPHA)
    assert overridden > 0  # every pattern set overrides something


@given(
    keys=st.lists(
        st.sampled_from(["q_proj", "proj", r".*_proj", r"layers\.1\..*", "self_attn.q_proj", "0.mlp.up_proj", "x"]),
        unique=True, max_size=4,
    ),
    name=st.sampled_from([
        "q_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj",
        "xq_proj", "blocks.q_proj.inner", "model.layers.10.self_attn.q_proj",
    ]),
)
def test_pattern_key_choice_equals_peft(keys: list[str], name: str) -> None:
    ranks = {key: index + 1 for index, key in enumerate(keys)}
    config = LoraConfig(r=64, lora_alpha=128, rank_pattern=ranks, alpha_pattern={k: 10.0 * v for k, v in ranks.items()})
    chosen = get_pattern_key(list(ranks), name)
    assert config.rank_and_alpha(name) == (ranks.get(chosen, 64), 10.0 * ranks[chosen] if chosen in ranks else 128)
