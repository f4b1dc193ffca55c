"""The module selection LoRA and (IA)^3 share (``prefix_hooks.core.targets``), on a hand-built model.

Oracle: the names the rules select, written out by hand for a model small enough to read; the
PEFT parity of each method's selection is checked in ``tests/lora`` and ``tests/ia3``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.config import TaskType
from prefix_hooks.core.targets import (
    AdaptableModules,
    family_default,
    matches_names,
    select_modules,
    select_modules_to_save,
    task_heads,
)

LINEARS = AdaptableModules("Tiny", "adapt", (nn.Linear, Conv1D), "nn.Linear, Conv1D")
HIDDEN = 4


@dataclass
class Fields:
    """The fields ``select_modules`` reads, without a method's config."""

    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: TaskType | str | None = None


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)


class Tiny(nn.Module):
    """``layers.{0,1}.{q_proj,v_proj,norm}``, ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(HIDDEN, 2)


class FakeAdapterLayer(nn.Module):
    """Looks like another method's adapter layer: ``base_layer`` and ``lora_A``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({"other": nn.Linear(HIDDEN, 1)})


class WithConfig(nn.Module):
    config = SimpleNamespace(model_type="tiny")


def names(
    model: nn.Module,
    targets: list[str] | str,
    fields: Fields | None = None,
    *,
    in_layers: Callable[[str], bool] | None = None,
    filters: Sequence[str] = (),
) -> list[str]:
    described = f"target_modules={targets!r}"
    selected = select_modules(
        model, targets, fields or Fields(), LINEARS, described=described, in_layers=in_layers, filters=filters
    )
    return [target.name for target in selected]


def test_list_entries_match_whole_names_or_dotted_suffixes() -> None:
    assert names(Tiny(), ["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert names(Tiny(), ["1.v_proj", "classifier"]) == ["layers.1.v_proj", "classifier"]
    assert not matches_names("layers.0.xq_proj", ["q_proj"])  # a suffix must start at a dot


def test_a_string_is_a_full_match_regex_and_all_linear_every_linear() -> None:
    assert names(Tiny(), r"layers\.0\..*_proj") == ["layers.0.q_proj", "layers.0.v_proj"]
    assert names(Tiny(), "ALL-LINEAR") == [f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")] + [
        "classifier"
    ]


def test_excluded_and_saved_modules_and_their_insides_are_never_targets() -> None:
    model = Tiny()
    assert names(model, ["q_proj", "v_proj"], Fields(exclude_modules=["0.q_proj"])) == [
        "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
    ]
    assert names(model, "all-linear", Fields(modules_to_save=["layers.1"], task_type="SEQ_CLS")) == [
        "layers.0.q_proj", "layers.0.v_proj",  # classifier: the SEQ_CLS head is saved
    ]


def test_the_layer_filter_applies_to_suffix_matches_only() -> None:
    def in_layer_one(name: str) -> bool:
        return name.startswith("layers.1.")

    selected = names(Tiny(), ["q_proj", "layers.0.v_proj"], in_layers=in_layer_one)
    assert selected == ["layers.0.v_proj", "layers.1.q_proj"]  # a full name is kept whatever its layer


def test_an_adapter_layer_counts_as_its_original_and_hides_its_insides() -> None:
    model = Tiny()
    block = model.layers[0]
    assert isinstance(block, Block)
    original = block.q_proj
    block.q_proj = FakeAdapterLayer(original)  # type: ignore[assignment]  # as another method's swap does
    selected = select_modules(model, "all-linear", Fields(), LINEARS, described="all")
    assert [target.name for target in selected][:2] == ["layers.0.q_proj", "layers.0.v_proj"]
    assert selected[0].module is original and selected[0].spellings == ("layers.0.q_proj",)


def test_errors_name_the_request_the_filters_and_what_the_method_adapts() -> None:
    with pytest.raises(ValueError, match=r"matches 'layers.0.norm' \(LayerNorm\), which Tiny cannot adapt; supported "):
        names(Tiny(), ["norm"])
    with pytest.raises(ValueError, match=r"target_modules=\['q'\] matches no module of Tiny; modules Tiny can adapt "
                                         r"include layers.0.q_proj"):
        names(Tiny(), ["q"])
    message = r"\(with layers=\[7\], exclude_modules='.\*' / modules_to_save=\[\]\) matches no module"
    with pytest.raises(ValueError, match=message):
        names(Tiny(), ["q_proj"], Fields(exclude_modules=".*"), filters=["layers=[7]"])


def test_family_defaults_and_task_heads() -> None:
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"target_modules=None but model_type=None \(Linear\).*or 'all-linear'$"):
        family_default(model, {}, "target_modules")
    with pytest.raises(ValueError, match=r"pass feedforward_modules: a list of module names or a regex$"):
        family_default(model, {}, "feedforward_modules")
    assert family_default(WithConfig(), {"tiny": ["q"]}, "target_modules") == ["q"]
    assert task_heads(None) == () and task_heads("SEQ_CLS") == ("classifier", "score")
    assert task_heads(TaskType.CAUSAL_LM) == ()


def test_modules_to_save_keep_the_outermost_and_optional_names_may_match_nothing() -> None:
    model = Tiny()
    assert select_modules_to_save(model, ["layers.0", "q_proj"], optional=["score"]) == ["layers.0", "layers.1.q_proj"]
    with pytest.raises(ValueError, match=r"modules_to_save entries \['score'\] match no module of Tiny"):
        select_modules_to_save(model, ["score"])
