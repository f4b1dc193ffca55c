"""Prompt tuning's and P-tuning's configs: every bad value is refused with a message naming it, and the
defaults are PEFT's."""

from __future__ import annotations

import dataclasses
from typing import Any

import peft
import pytest

from prefix_hooks.prompt.config import (
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)

CONFIG_ERRORS: list[tuple[type, dict[str, Any], str]] = [
    (PromptTuningConfig, {"num_virtual_tokens": 0}, r"num_virtual_tokens=0 is not accepted; expected a positive int"),
    (PromptTuningConfig, {"num_virtual_tokens": None}, r"num_virtual_tokens=None is not accepted"),
    (PromptTuningConfig, {"num_virtual_tokens": True}, r"num_virtual_tokens=True is not accepted"),
    (PromptTuningConfig, {"token_dim": -1}, r"token_dim=-1 is not accepted"),
    (PromptTuningConfig, {"token_dim": 2.5}, r"token_dim=2.5 is not accepted"),
    (PromptEncoderConfig, {"num_attention_heads": 0}, r"num_attention_heads=0 is not accepted"),
    (PromptEncoderConfig, {"num_layers": "2"}, r"num_layers='2' is not accepted"),
    (
        PromptTuningConfig,
        {"num_transformer_submodules": 3},
        r"num_transformer_submodules=3 is not accepted; expected 1, 2 or None",
    ),
    (PromptTuningConfig, {"modules_to_save": "score"}, r"modules_to_save='score' is not accepted"),
    (PromptEncoderConfig, {"modules_to_save": ["score", ""]}, r"modules_to_save=\['score', ''\] is not accepted"),
    (PromptTuningConfig, {"inference_mode": 1}, r"inference_mode=1 is not accepted; expected a bool \(True or False\)"),
    (PromptTuningConfig, {"keep_virtual_outputs": "yes"}, r"keep_virtual_outputs='yes' is not accepted"),
    (PromptTuningConfig, {"task_type": "TRANSLATE"}, r"task_type='TRANSLATE' is not accepted; expected one of"),
    (
        PromptTuningConfig,
        {"prompt_tuning_init": "ZEROS"},
        r"prompt_tuning_init='ZEROS' is not accepted; expected one of 'RANDOM', 'TEXT', 'SAMPLE_VOCAB'",
    ),
    (
        PromptTuningConfig,
        {"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "tok"},
        r"prompt_tuning_init_text=None is not accepted with prompt_tuning_init='TEXT'",
    ),
    (
        PromptTuningConfig,
        {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "", "tokenizer_name_or_path": "tok"},
        r"prompt_tuning_init_text='' is not accepted",
    ),
    (
        PromptTuningConfig,
        {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"},
        r"tokenizer_name_or_path=None is not accepted with prompt_tuning_init='TEXT'",
    ),
    (
        PromptTuningConfig,
        {"prompt_tuning_init_text": "hi"},
        r"prompt_tuning_init_text='hi' is only used with prompt_tuning_init='TEXT', not 'RANDOM'",
    ),
    (
        PromptTuningConfig,
        {"prompt_tuning_init": "SAMPLE_VOCAB", "tokenizer_kwargs": {}},
        r"tokenizer_kwargs=\{\} is only used with prompt_tuning_init='TEXT', not 'SAMPLE_VOCAB'",
    ),
    (
        PromptTuningConfig,
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "hi",
            "tokenizer_name_or_path": "t",
            "tokenizer_kwargs": ["x"],
        },
        r"tokenizer_kwargs=\['x'\] is not accepted; expected a dict or None",
    ),
    (PromptTuningConfig, {"peft_type": "P_TUNING"}, r"peft_type='P_TUNING' is not accepted; expected 'PROMPT_TUNING'"),
    (
        PromptEncoderConfig,
        {"encoder_reparameterization_type": "GRU"},
        r"encoder_reparameterization_type='GRU' is not accepted; expected one of 'MLP', 'LSTM'",
    ),
    (PromptEncoderConfig, {"encoder_hidden_size": 0}, r"encoder_hidden_size=0 is not accepted"),
    (
        PromptEncoderConfig,
        {"encoder_num_layers": None},
        r"encoder_num_layers=None is not accepted; expected a positive int",
    ),
    (
        PromptEncoderConfig,
        {"encoder_dropout": 1.0},
        r"encoder_dropout=1.0 is not accepted; expected a number with 0 <= p < 1",
    ),
    (PromptEncoderConfig, {"encoder_dropout": -0.1}, r"encoder_dropout=-0.1 is not accepted"),
    (PromptEncoderConfig, {"encoder_dropout": True}, r"encoder_dropout=True is not accepted"),
    (PromptEncoderConfig, {"peft_type": "LORA"}, r"peft_type='LORA' is not accepted; expected 'P_TUNING'"),
]


@pytest.mark.parametrize(
    ("cls", "fields", "message"), CONFIG_ERRORS, ids=[f"{c.__name__}-{next(iter(f))}" for c, f, _ in CONFIG_ERRORS]
)
def test_config_rejects_bad_values(cls: type, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_config_accepts_strings_and_defaults_match_peft() -> None:
    tuning = PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB", task_type="SEQ_CLS")
    encoder = PromptEncoderConfig(encoder_reparameterization_type="LSTM")
    assert tuning.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB
    assert encoder.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM
    for ours, theirs in (
        (PromptTuningConfig(), peft.PromptTuningConfig()),
        (PromptEncoderConfig(), peft.PromptEncoderConfig()),
    ):
        for field in dataclasses.fields(ours):
            # PEFT leaves num_virtual_tokens None (required in practice); ours defaults to 20
            if hasattr(theirs, field.name) and field.name not in ("peft_type", "num_virtual_tokens"):
                assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
