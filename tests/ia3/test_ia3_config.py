"""IA3Config (PEFT's fields, defaults and checks) and target selection (PEFT's rules and our
family defaults on every supported model type)."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from peft.tuners.ia3.layer import IA3Layer
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from tiny_encoders import build as build_encoder
from tiny_ia3 import FAMILIES, build, example_inputs, output_of, randomise
from tiny_models import build_model
from tiny_seq2seq import build as build_seq2seq
from torch import nn

from prefix_hooks import supported
from prefix_hooks.core.config import PeftType, TaskType
from prefix_hooks.ia3 import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES, IA3Config, attach_ia3, select_targets


def test_fields_and_defaults_are_peft_s() -> None:
    ours = IA3Config().to_dict()
    theirs = peft.IA3Config().to_dict()
    shared = set(ours) & set(theirs)
    assert set(ours) <= set(theirs)
    for key in shared:
        assert ours[key] == (theirs[key].value if hasattr(theirs[key], "value") else theirs[key]), key
    assert ours["peft_type"] == "IA3" and ours["init_ia3_weights"] is True


def test_lists_become_sets_and_serialise_sorted() -> None:
    config = IA3Config(target_modules=["v", "k", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM")
    assert config.target_modules == {"k", "v", "wo"} and config.feedforward_modules == {"wo"}
    assert config.task_type is TaskType.SEQ_2_SEQ_LM and config.peft_type is PeftType.IA3
    assert config.to_dict()["target_modules"] == ["k", "v", "wo"]
    assert config.to_dict()["task_type"] == "SEQ_2_SEQ_LM"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": ["k"], "feedforward_modules": ["wo"]}, r"feedforward_modules=\['wo'\] is not a subset"),
        ({"target_modules": []}, r"target_modules=\[\] selects no module"),
        ({"target_modules": 3}, "target_modules=3 is not accepted"),
        ({"target_modules": "("}, r"target_modules='\(' is not a valid regular expression"),
        ({"feedforward_modules": "all-linear"}, "feedforward_modules='all-linear' is not accepted"),
        ({"exclude_modules": [""]}, r"exclude_modules=\[''\] is not accepted"),
        ({"init_ia3_weights": "ones"}, "init_ia3_weights='ones' is not accepted"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out=1 is not accepted"),
        ({"modules_to_save": "classifier"}, "modules_to_save='classifier' is not accepted"),
        ({"task_type": "CLASSIFY"}, "task_type='CLASSIFY' is not accepted"),
        ({"peft_type": "LORA"}, "peft_type='LORA' is not accepted; expected 'IA3'"),
    ],
)
def test_bad_fields_raise_naming_the_value(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IA3Config(**fields)


def test_peft_s_own_checks_agree() -> None:
    with pytest.raises(ValueError):
        peft.IA3Config(target_modules=["k"], feedforward_modules=["wo"])
    IA3Config(target_modules="k|wo", feedforward_modules=["anything"])  # PEFT checks only two lists
    peft.IA3Config(target_modules="k|wo", feedforward_modules=["anything"])


def test_default_tables_extend_peft_and_cover_every_supported_family() -> None:
    for model_type, targets in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.items():
        assert DEFAULT_TARGET_MODULES[model_type] == targets, model_type
    for model_type, feedforward in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.items():
        assert DEFAULT_FEEDFORWARD_MODULES[model_type] == feedforward, model_type
    missing = [t for t in supported() if t not in DEFAULT_TARGET_MODULES or t not in DEFAULT_FEEDFORWARD_MODULES]
    assert not missing
    assert set(FAMILIES) == set(supported())  # the walk below covers every supported type


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_defaults_select_both_kinds_and_change_the_output(model_type: str) -> None:
    model = build(model_type)
    inputs = example_inputs(model_type)
    targets = select_targets(model, IA3Config())
    assert any(t.feedforward for t in targets) and any(not t.feedforward for t in targets)
    handle = attach_ia3(model, IA3Config())
    with torch.no_grad():
        base = output_of(model, inputs)
        with handle:
            identity = output_of(model, inputs)  # vectors start at ones
            randomise(handle)
            scaled = output_of(model, inputs)
    assert torch.equal(identity, base)
    assert (scaled - base).abs().max() > 1e-4


def peft_selection(model: nn.Module, **fields: Any) -> dict[str, bool]:
    twin = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**fields))
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.is_feedforward
        for name, module in twin.named_modules()
        if isinstance(module, IA3Layer)
    }


SELECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}),
    ("gpt2", {}),
    ("bert", {"task_type": "SEQ_CLS"}),
    ("t5", {}),
    ("opt", {"exclude_modules": ["model.decoder.layers.0.fc2"]}),
    ("llama", {"target_modules": r".*\.(q_proj|up_proj)", "feedforward_modules": r".*up_proj"}),
    ("llama", {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "o_proj"]}),
    ("bert", {"target_modules": ["dense", "key"], "feedforward_modules": ["dense"], "modules_to_save": ["pooler"]}),
    ("llama", {"target_modules": r".*\.(k_proj|down_proj)", "feedforward_modules": ["n_proj"]}),  # plain suffix
]


@pytest.mark.parametrize(("model_type", "fields"), SELECTIONS)
def test_selection_matches_peft(model_type: str, fields: dict[str, Any]) -> None:
    model = build_encoder(model_type) if model_type == "bert" else (
        build_seq2seq(model_type) if model_type == "t5" else build_model(model_type)
    )
    ours = {t.name: t.feedforward for t in select_targets(model, IA3Config(**fields))}
    assert ours == peft_selection(model, **fields)


def test_selection_errors_name_the_value() -> None:
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"matches 'model.embed_tokens' \(Embedding\), which \(IA\)\^3 cannot scale"):
        attach_ia3(model, IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"target_modules=\{'nothing'\}.*matches no module of LlamaForCausalLM"):
        attach_ia3(model, IA3Config(target_modules=["nothing"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"modules_to_save entries \['head'\] match no module"):
        attach_ia3(model, IA3Config(modules_to_save=["head"]))
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target_modules=None but model_type=None"):
        attach_ia3(plain, IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules=None but model_type=None"):
        attach_ia3(plain, IA3Config(target_modules=["0"]))
    with pytest.raises(TypeError, match="config must be a prefix_hooks.IA3Config, got peft"):
        attach_ia3(model, peft.IA3Config())  # type: ignore[arg-type]


def test_a_peft_config_converts_as_the_type_error_says() -> None:
    theirs = peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
    )
    fields = {k: v for k, v in theirs.to_dict().items() if k in IA3Config.__dataclass_fields__}
    ours = IA3Config(**fields)
    assert ours.target_modules == {"k_proj", "down_proj"} and ours.feedforward_modules == {"down_proj"}
    assert ours.task_type is TaskType.CAUSAL_LM
