"""Target selection: the modules ``select_targets`` picks are exactly the ones ``peft.get_peft_model``
wraps on the same model (list, regex, all-linear, exclusions, layer filters, family defaults),
and ``select_modules_to_save`` picks the modules PEFT saves."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import peft
import pytest
import tiny_encoders
import tiny_inline
import tiny_models
import tiny_seq2seq
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks import supported
from prefix_hooks.lora import DEFAULT_TARGET_MODULES, LoraConfig, select_modules_to_save, select_targets
from prefix_hooks.lora.targets import SUPPORTED_MODULE_TYPES, layer_index, task_modules_to_save

MAX_DEPTH = 4


class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Linear(channels, channels)
        self.pre_gate = nn.Linear(channels, channels)  # "gate" must not match it (dotted suffixes only)


class TinyConvNet(nn.Module):
    """Conv2d model with the blocks at depth 2 (``body.blocks.<i>``), an embedding and a head."""

    def __init__(self, depth: int = 2, channels: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, channels)
        self.stem = nn.Conv2d(3, channels, 3, stride=2)
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(depth))
        self.head = nn.Linear(channels, 5)


def build_conv(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNet(depth).eval()


# name -> (builder taking a depth, candidate target names, layer container name)
MODELS: dict[str, tuple[Callable[[int], nn.Module], list[str], str]] = {
    "llama": (
        lambda depth: tiny_models.build_model("llama", num_hidden_layers=depth),
        ["q_proj", "v_proj", "self_attn.o_proj", "down_proj", "embed_tokens"], "layers",
    ),
    "gpt2": (
        lambda depth: tiny_models.build_model("gpt2", n_layer=depth),
        ["c_attn", "c_proj", "mlp.c_fc", "wte"], "h",
    ),
    "bert": (
        lambda depth: tiny_encoders.build_head("bert", "sequence", num_hidden_layers=depth),
        ["query", "value", "attention.output.dense", "dense"], "layer",
    ),
    "vit": (
        lambda depth: tiny_encoders.build_head("vit", "image", num_hidden_layers=depth),
        ["q_proj", "k_proj", "attention.o_proj", "fc1", "projection"], "layers",
    ),
    "conv": (build_conv, ["conv1", "conv2", "gate", "stem"], "blocks"),
    # bare stacks: the layer container starts the name, where PEFT finds an index only through layers_pattern
    "llama_stack": (
        lambda depth: tiny_models.build_model("llama", num_hidden_layers=depth).get_submodule("model"),
        ["q_proj", "v_proj", "mlp.up_proj"], "layers",
    ),
    "gpt2_stack": (
        lambda depth: tiny_models.build_model("gpt2", n_layer=depth).get_submodule("transformer"), ["c_attn", "c_proj"],
        "h",
    ),
}

# (model, config fields): each checked against PEFT
CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": ["mlp.down_proj", "model.layers.1.self_attn.k_proj"]}),
    ("llama", {"target_modules": r".*\.(q|k)_proj"}),
    ("llama", {"target_modules": r"model\.layers\.1\..*_proj"}),
    ("llama", {"target_modules": r".*q_proj|.*layers\.1\.mlp\.up"}),  # the whole name must match
    ("llama", {"target_modules": "all-linear", "exclude_modules": r"model\.layers\.0"}),  # excludes nothing
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": "ALL-LINEAR", "exclude_modules": ["o_proj", "mlp.gate_proj"]}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": r".*layers\.0\..*"}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "lm_head"], "exclude_modules": []}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []}),  # [] means every layer
    # a full qualified name is kept whatever its layer (PEFT's rule)
    ("llama", {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": "all-linear", "modules_to_save": ["mlp"]}),
    ("gpt2", {"target_modules": ["c_attn"]}),
    ("gpt2", {"target_modules": ["c_proj"]}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1], "layers_pattern": ["blocks", "h"]}),
    ("gpt2", {"target_modules": ["attn.c_proj", "wte"], "exclude_modules": ["transformer.h.0.attn.c_proj"]}),
    ("bert", {"target_modules": ["query", "value"]}),
    ("bert", {"target_modules": "all-linear"}),  # no task_type: the classifier is a target too
    ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    ("bert", {"target_modules": "all-linear", "modules_to_save": ["classifier"]}),
    ("bert", {"target_modules": ["dense"], "modules_to_save": ["pooler"], "layers_to_transform": [0, 1]}),
    ("vit", {"target_modules": ["q_proj", "v_proj"]}),
    ("vit", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    ("vit", {"target_modules": ["projection", "q_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}),
    ("conv", {"target_modules": ["conv1", "conv2", "stem"]}),
    ("conv", {"target_modules": r"body\.blocks\.\d\.conv\d|embed"}),
    ("conv", {"target_modules": "all-linear"}),  # no PreTrainedModel: the head stays a target
    ("conv", {"target_modules": ["conv1", "gate"], "layers_to_transform": [1]}),
    ("conv", {"target_modules": ["conv1", "gate"], "layers_to_transform": [0], "layers_pattern": "blocks"}),
]


def peft_wrapped(model: nn.Module, **fields: Any) -> nn.Module:
    """``model`` after ``peft.get_peft_model`` (PEFT's LoRA layers in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out / tied-weight notes
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**fields))
    inner = wrapped.base_model.model
    assert isinstance(inner, nn.Module)
    return inner


def peft_selection(model: nn.Module, **fields: Any) -> set[str]:
    """Names of the modules ``peft.get_peft_model`` wraps with a LoRA layer (the oracle); empty
    where PEFT finds no module to wrap."""
    try:
        wrapped = peft_wrapped(model, **fields)
    except NoMatchingPeftModuleError:
        return set()
    return {name for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}


def peft_saved(model: nn.Module, **fields: Any) -> set[str]:
    """Names of the modules PEFT replaces by a ``ModulesToSaveWrapper``."""
    modules = peft_wrapped(model, **fields).named_modules()
    return {name for name, module in modules if isinstance(module, ModulesToSaveWrapper)}


def assert_same_as_peft(build: Callable[[], nn.Module], fields: dict[str, Any]) -> list[str]:
    model = build()
    order = [name for name, _ in model.named_modules()]
    ours = select_targets(model, LoraConfig(**fields))
    assert ours == sorted(ours, key=order.index)  # named_modules() order
    assert len(set(ours)) == len(ours)
    assert set(ours) == peft_selection(build(), **fields)
    return ours


# --- parity with PEFT ---------------------------------------------------------------------------
@pytest.mark.parametrize(("model_name", "fields"), CASES)
def test_selection_equals_peft(model_name: str, fields: dict[str, Any]) -> None:
    build, _, _ = MODELS[model_name]
    ours = assert_same_as_peft(lambda: build(2), fields)
    assert ours, "every case selects something"


@st.composite
def layer_filters(draw: st.DrawFn, model_name: str) -> tuple[int, dict[str, Any]]:
    """A depth and a list target with a layer filter (by index list or single index, with or without a pattern)."""
    _, candidates, container = MODELS[model_name]
    depth = draw(st.integers(1, MAX_DEPTH))
    layers = draw(st.lists(st.integers(0, depth - 1), unique=True, min_size=1, max_size=depth))
    fields: dict[str, Any] = {
        "target_modules": draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True)),
        "layers_to_transform": layers[0] if draw(st.booleans()) else layers,
        "layers_pattern": draw(st.sampled_from([None, container, [container], ["blocks", container]])),
    }
    return depth, fields


@pytest.mark.parametrize("model_name", sorted(MODELS))
@given(data=st.data())
def test_layer_filter_equals_peft_over_depths(model_name: str, data: st.DataObject) -> None:
    depth, fields = data.draw(layer_filters(model_name))
    build, _, _ = MODELS[model_name]
    expected = peft_selection(build(depth), **fields)
    if not expected:  # PEFT refuses a config that matches nothing; so do we
        with pytest.raises(ValueError, match="matches no module"):
            select_targets(build(depth), LoraConfig(**fields))
        return
    assert set(select_targets(build(depth), LoraConfig(**fields))) == expected


def test_second_adapter_targets_the_lora_layers_not_their_insides() -> None:
    """On a model that already has LoRA layers, a layer counts as the module it wraps (PEFT's rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(tiny_models.build_model("gpt2"), peft.LoraConfig(target_modules=["c_attn"]))
        inner = wrapped.base_model.model
        assert isinstance(inner, nn.Module)
        for fields in ({"target_modules": "all-linear"}, {"target_modules": ["c_attn", "c_fc"]}):
            ours = select_targets(inner, LoraConfig(**fields))
            name = f"second{len(fields['target_modules'])}"
            wrapped.add_adapter(name, peft.LoraConfig(**fields))
            theirs = {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}
            assert set(ours) == theirs
            assert "transformer.h.0.attn.c_attn" in ours
            assert not any(".base_layer" in n or ".lora_" in n for n in ours)


# --- family defaults -------------------------------------------------------------------------------
def _default_builders() -> dict[str, Callable[[], nn.Module]]:
    builders: dict[str, Callable[[], nn.Module]] = {
        family: functools.partial(tiny_models.build_model, family) for family in tiny_models.FAMILIES
    }
    builders.update({family: functools.partial(tiny_encoders.build, family) for family in tiny_encoders.FAMILIES})
    builders.update({family: functools.partial(tiny_inline.build, family) for family in tiny_inline.FAMILIES})
    builders.update({family: functools.partial(tiny_seq2seq.build, family) for family in tiny_seq2seq.FAMILIES})
    return builders


DEFAULT_BUILDERS = _default_builders()


def test_every_supported_family_has_a_default_and_a_tiny_model() -> None:
    assert set(supported()) <= set(DEFAULT_TARGET_MODULES)
    assert set(supported()) <= set(DEFAULT_BUILDERS)
    for model_type, targets in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items():
        assert DEFAULT_TARGET_MODULES[model_type] == targets, model_type  # PEFT's defaults are kept


@pytest.mark.parametrize("family", supported())
def test_default_targets_are_peft_defaults_or_the_attention_projections(family: str) -> None:
    build = DEFAULT_BUILDERS[family]
    model = build()
    ours = select_targets(model, LoraConfig())
    assert ours
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], SUPPORTED_MODULE_TYPES) for name in ours)
    if family in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        assert set(ours) == peft_selection(build())  # PEFT's own default
    else:  # the same names given explicitly select the same modules in PEFT
        assert set(ours) == peft_selection(build(), target_modules=DEFAULT_TARGET_MODULES[family])
    default = DEFAULT_TARGET_MODULES[family]
    if isinstance(default, list):  # every name of the default names something in this family
        for entry in default:
            assert select_targets(model, LoraConfig(target_modules=[entry])), entry
    if family == "llava":
        assert all(".language_model." in name for name in ours)


# --- modules_to_save ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "head", "fields"),
    [
        ("bert", "sequence", {"modules_to_save": ["classifier"]}),
        ("bert", "sequence", {"task_type": "SEQ_CLS"}),  # PEFT saves classifier/score for the task
        ("roberta", "sequence", {"task_type": "SEQ_CLS"}),  # a head module with children
        ("roberta", "features", {"modules_to_save": ["pooler"]}),
        ("bert", "token", {"task_type": "TOKEN_CLS"}),
        ("bert", "question_answering", {"task_type": "QUESTION_ANS"}),
        ("bert", "sequence", {"modules_to_save": ["classifier", "bert.pooler.dense", "pooler"]}),
        ("vit", "image", {"modules_to_save": ["classifier", "layernorm"]}),
    ],
)
def test_modules_to_save_equal_peft(model_type: str, head: str, fields: dict[str, Any]) -> None:
    fields = {"target_modules": DEFAULT_TARGET_MODULES[model_type], **fields}
    config = LoraConfig(**fields)
    model = tiny_encoders.build_head(model_type, head)
    ours = select_modules_to_save(model, config.modules_to_save or [], optional=task_modules_to_save(config))
    theirs = peft_saved(tiny_encoders.build_head(model_type, head), **fields)
    # PEFT also wraps bert.pooler.dense inside the already saved pooler; its copy is part of the pooler's
    assert set(ours) == {name for name in theirs if not any(name.startswith(p + ".") for p in theirs)}
    assert ours
    assert not set(select_targets(model, config)) & set(ours)


def test_modules_to_save_match_dotted_suffixes_only() -> None:
    """PEFT's bare ``endswith`` also saves distilbert's ``pre_classifier`` for ``"classifier"``; we do not."""
    model = tiny_encoders.build_head("distilbert", "sequence")
    assert select_modules_to_save(model, ["classifier"]) == ["classifier"]
    theirs = peft_saved(tiny_encoders.build_head("distilbert", "sequence"), target_modules=["q_lin"],
                        modules_to_save=["classifier"])
    assert theirs == {"classifier", "pre_classifier"}


def test_missing_module_to_save_is_refused_by_name() -> None:
    model = tiny_encoders.build_head("bert", "sequence")
    with pytest.raises(ValueError, match=r"modules_to_save entries \['score'\] match no module of Bert"):
        select_modules_to_save(model, ["classifier", "score"])
    assert select_modules_to_save(model, [], optional=["score", "classifier"]) == ["classifier"]


# --- layer index -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.12.attn.c_attn", None, 12),
        ("h.3.attn.c_attn", None, None),  # an index at depth 1 does not count without a pattern (PEFT)
        ("h.3.attn.c_attn", "h", 3),
        ("model.layers.1.experts.0.w1", None, 1),  # the first index, not an expert's
        ("model.layers.1.experts.0.w1", "experts", 0),
        ("a.layers.0.b.layers.1.c", "layers", 0),
        ("layers.0.b.layers.1.c", "layers", 0),  # a container at the start comes first
        ("model.layers.3", None, None),  # the index must be followed by a component
        ("model.mylayers.3.q", "layers", None),  # whole components only
        ("encoder.layer.2.attention.self.query", ["h", "layer"], 2),
    ],
)
def test_layer_index(name: str, pattern: str | list[str] | None, expected: int | None) -> None:
    assert layer_index(name, pattern) == expected


# --- errors ------------------------------------------------------------------------------------------
def test_target_matching_nothing_is_refused_naming_it() -> None:
    model = tiny_models.build_model("llama")
    with pytest.raises(ValueError) as error:
        select_targets(model, LoraConfig(target_modules=["qproj", "vproj"]))
    message = str(error.value)
    assert "target_modules=['qproj', 'vproj']" in message and "matches no module of LlamaForCausalLM" in message
    assert "model.layers.0.self_attn.q_proj" in message  # names to choose from


def test_filters_removing_every_match_are_named() -> None:
    model = tiny_models.build_model("llama")
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\].*matches no module"):
        select_targets(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(ValueError, match=r"exclude_modules=.*matches no module"):
        select_targets(model, LoraConfig(target_modules=["q_proj"], exclude_modules=r".*self_attn.*"))


def test_regex_target_matching_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"target_modules='.\*nothing' matches no module"):
        select_targets(build_conv(), LoraConfig(target_modules=".*nothing"))


@pytest.mark.parametrize(
    ("model_name", "targets", "named"),
    [
        ("llama", ["self_attn"], "'model.layers.0.self_attn' (LlamaAttention)"),
        ("llama", r".*input_layernorm", "(LlamaRMSNorm)"),
        ("conv", ["norm"], "'body.blocks.0.norm' (BatchNorm2d)"),
        ("gpt2", ["attn"], "(GPT2Attention)"),
    ],
)
def test_unsupported_module_type_is_refused_naming_it(model_name: str, targets: Any, named: str) -> None:
    build, _, _ = MODELS[model_name]
    with pytest.raises(ValueError) as error:
        select_targets(build(2), LoraConfig(target_modules=targets))
    message = str(error.value)
    assert named in message and "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv2d" in message, message
    with warnings.catch_warnings(), pytest.raises(ValueError, match="is not supported"):
        warnings.simplefilter("ignore")
        peft_selection(build(2), target_modules=targets)  # PEFT refuses them too


def test_no_default_is_refused_naming_the_family() -> None:
    with pytest.raises(ValueError, match=r"target_modules=None but model_type=None \(TinyConvNet\) has no default"):
        select_targets(build_conv(), LoraConfig())


def test_default_regex_refuses_layer_filters() -> None:
    llava = tiny_encoders.build("llava")
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] needs a list of target names"):
        select_targets(llava, LoraConfig(layers_to_transform=[0]))


def test_selection_reads_only() -> None:
    model = tiny_models.build_model("gpt2")
    before = [(name, module, type(module)) for name, module in model.named_modules()]
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    select_targets(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    assert [(name, module, type(module)) for name, module in model.named_modules()] == before
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
