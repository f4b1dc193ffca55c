"""``AdaLoraConfig``: PEFT's fields and defaults, and the errors (naming the value and what is accepted)
for what PEFT's AdaLoRA would reject, fail on later, or silently ignore."""

from __future__ import annotations

import dataclasses
from typing import Any

import peft
import pytest

from prefix_hooks import AdaLoraConfig, LoraConfig, PeftType

VALID: dict[str, Any] = {"total_step": 10}


def test_fields_and_defaults_are_peft_s() -> None:
    ours = {f.name: f for f in dataclasses.fields(AdaLoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.AdaLoraConfig)}
    own = {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}
    assert own <= set(ours) and set(ours) <= set(theirs)
    for name in own | {"rank_pattern", "lora_alpha", "lora_dropout", "r", "init_lora_weights", "bias"}:
        assert ours[name].default == theirs[name].default, name
    config = AdaLoraConfig(**VALID)
    assert config.peft_type == PeftType.ADALORA and isinstance(config, LoraConfig)
    assert config.rank_pattern is None and config.alpha_pattern == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"total_step": None}, r"total_step=None is not accepted; AdaLoRA needs the number of training steps"),
        ({"total_step": 0}, r"total_step=0 is not accepted"),
        (
            {"total_step": 10, "tinit": 4, "tfinal": 6},
            r"tinit=4 and tfinal=6 leave no budgeting phase within total_step=10",
        ),
        ({"init_r": 4, "target_r": 8}, r"init_r=4 is smaller than target_r=8"),
        ({"init_r": 0}, r"init_r=0 is not accepted; expected a positive int"),
        ({"target_r": 2.5}, r"target_r=2.5 is not accepted"),
        ({"deltaT": 0}, r"deltaT=0 is not accepted"),
        ({"tinit": -1}, r"tinit=-1 is not accepted; expected an int >= 0"),
        ({"beta1": 1.0}, r"beta1=1.0 is not accepted; expected a number with 0 < beta1 < 1"),
        ({"beta2": 0}, r"beta2=0 is not accepted"),
        ({"orth_reg_weight": -0.1}, r"orth_reg_weight=-0.1 is not accepted; expected a number >= 0"),
        ({"use_rslora": True}, r"use_rslora=True is not accepted: AdaLoRA scales every update by lora_alpha / ranknum"),
        ({"alpha_pattern": {"q_proj": 4}}, r"alpha_pattern=\{'q_proj': 4\} is not accepted"),
        ({"use_dora": True}, r"ADALORA does not support DoRA"),
        ({"rank_pattern": {"q.lora_E": [True, 1]}}, r"rank_pattern\['q.lora_E'\]=\[True, 1\] is not accepted"),
        ({"rank_pattern": {"q.lora_E": [True] * 3}}, r"rank_pattern\['q.lora_E'\] has 3 entries but init_r=12"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 is not accepted"),
        ({"bias": "some"}, r"bias='some' is not accepted"),
        ({"peft_type": "LORA"}, r"peft_type='LORA' is not accepted; expected 'ADALORA'"),
    ],
)
def test_bad_values_raise_naming_them(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**{**VALID, **fields})


def test_r_is_ignored_with_a_warning_as_in_peft() -> None:
    with pytest.warns(UserWarning, match=r"r=16 is not used by AdaLoRA and is ignored; the initial rank is init_r=12"):
        config = AdaLoraConfig(r=16, **VALID)
    assert config.r == 16


def test_shared_fields_are_normalised_as_lora_s() -> None:
    config = AdaLoraConfig(
        target_modules=["q_proj", "v_proj"], modules_to_save=("score",), task_type="SEQ_CLS", **VALID
    )
    assert config.target_modules == {"q_proj", "v_proj"} and config.modules_to_save == ["score"]
    assert config.to_dict()["peft_type"] == "ADALORA"
    assert AdaLoraConfig.from_dict(config.to_dict()) == config
