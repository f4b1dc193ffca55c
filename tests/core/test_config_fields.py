"""The config fields LoRA and (IA)^3 share (``prefix_hooks.core.config_fields``): checked, normalised,
never stored; and the check that a handle got its own config class.

Oracle: the values and messages written out by hand; each method's full validation is checked
in ``tests/lora/test_lora_config.py`` and ``tests/ia3/test_ia3_config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peft
import pytest

from prefix_hooks import AdapterConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from prefix_hooks.core.config import PeftType, TaskType
from prefix_hooks.core.config_fields import checked_module_fields, module_filter, require_config


@dataclass
class Fields:
    """The fields ``checked_module_fields`` reads, and one flag."""

    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: Any = None
    task_type: Any = None
    peft_type: Any = PeftType.LORA
    flag: Any = False


def test_module_filters_become_a_set_a_regex_or_none() -> None:
    assert module_filter("target_modules", ["q", "v", "q"], allow_empty=False) == {"q", "v"}
    assert module_filter("target_modules", "All-Linear", allow_empty=False) == "All-Linear"
    assert module_filter("exclude_modules", r".*\.q", allow_empty=True) == r".*\.q"
    assert module_filter("exclude_modules", (), allow_empty=True) == set()
    assert module_filter("exclude_modules", None, allow_empty=True) is None


@pytest.mark.parametrize(
    ("name", "value", "allow_empty", "message"),
    [
        ("target_modules", [], False, r"target_modules=\[\] selects no module"),
        ("exclude_modules", "all-linear", True, "'all-linear' is a target_modules shorthand"),
        ("target_modules", "(", False, r"target_modules='\(' is not a valid regular expression"),
        ("target_modules", ["q", 3], False, r"expected a list of module names"),
    ],
)
def test_bad_module_filters_are_refused_by_name(name: str, value: object, allow_empty: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        module_filter(name, value, allow_empty=allow_empty)


def test_checked_fields_are_normalised_and_not_stored() -> None:
    fields = Fields(target_modules=["v", "q"], modules_to_save=["head", "cls", "head"], task_type="SEQ_CLS")
    checked = checked_module_fields(fields, PeftType.LORA, ("flag",))
    assert checked == {
        "target_modules": {"q", "v"},
        "exclude_modules": None,
        "modules_to_save": ["head", "cls"],  # the user's order, repeats dropped
        "task_type": TaskType.SEQ_CLS,
        "peft_type": PeftType.LORA,
    }
    assert fields.target_modules == ["v", "q"]  # nothing stored
    assert checked_module_fields(Fields(modules_to_save={"b", "a"}), PeftType.LORA, ())["modules_to_save"] == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (Fields(flag=1), "flag=1 is not accepted; expected True or False"),
        (Fields(modules_to_save="head"), "modules_to_save='head' is not accepted"),
        (Fields(task_type="CLASSIFY"), "task_type='CLASSIFY' is not accepted; expected one of SEQ_CLS"),
        (Fields(peft_type="IA3"), "peft_type='IA3' is not accepted; expected 'LORA'"),
    ],
)
def test_bad_fields_are_refused_by_name(fields: Fields, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checked_module_fields(fields, PeftType.LORA, ("flag",))


@pytest.mark.parametrize("config", [
    LoraConfig(modules_to_save=["classifier"], rank_pattern={"q_proj": 4}),
    IA3Config(modules_to_save=["classifier"]),
    PrefixTuningConfig(num_virtual_tokens=2, modules_to_save=["classifier"]),
    PromptTuningConfig(num_virtual_tokens=2, modules_to_save=["classifier"]),
], ids=lambda config: type(config).__name__)
def test_to_dict_results_do_not_alias_the_config(config: AdapterConfig) -> None:
    out = config.to_dict()
    out["modules_to_save"].append("score")  # every config here has modules_to_save
    for value in out.values():
        if isinstance(value, dict):
            value["changed"] = 1
    assert getattr(config, "modules_to_save") == ["classifier"]
    assert all("changed" not in value for value in vars(config).values() if isinstance(value, dict))


def test_a_handle_needs_its_own_config_class() -> None:
    config = IA3Config()
    assert require_config(config, IA3Config) is config
    with pytest.raises(TypeError, match=r"config must be a prefix_hooks.LoraConfig, got peft\.tuners\.lora"):
        require_config(peft.LoraConfig(), LoraConfig)
    with pytest.raises(TypeError, match=r"got prefix_hooks\.ia3\.config\.IA3Config"):
        require_config(config, LoraConfig)
