"""Adapter configs to and from ``adapter_config.json`` (PEFT's form, with our extra keys).

A saved config holds PEFT's keys at the top level, so PEFT reads it, and the fields of ours
that PEFT has no place for under ``config["prefix_hooks"]`` (PEFT drops that key with a
warning). Reading accepts PEFT's files, ours, and flat :meth:`AdapterConfig.to_dict` output:

* a key that is a field of the config class is type-checked against the field's annotation
  (a wrong type raises ``ValueError`` naming key and value), then the class validates values;
* a PEFT 0.21 key that we do not implement loads silently at PEFT's default and raises at
  any other value (we cannot honour it);
* PEFT's informational keys (``auto_mapping``, ``peft_version``, ``runtime_config``) are dropped whatever their value;
* any other key (from a newer PEFT, say) is dropped with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any

from prefix_hooks.checkpoint.codec import EXTRA_CONFIG_KEY
from prefix_hooks.core.config import AdapterConfig, PeftType
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.lora.adalora.config import AdaLoraConfig
from prefix_hooks.lora.config import LoraConfig
from prefix_hooks.prefix.config import PrefixTuningConfig
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig

FORMAT_VERSION = 1
"""Version of our additions to PEFT's folder format, saved as ``config["prefix_hooks"]["format_version"]``."""

CONFIG_CLASSES: dict[PeftType, type[AdapterConfig]] = {
    PeftType.PREFIX_TUNING: PrefixTuningConfig,
    PeftType.PROMPT_TUNING: PromptTuningConfig,
    PeftType.P_TUNING: PromptEncoderConfig,
    PeftType.LORA: LoraConfig,
    PeftType.IA3: IA3Config,
    PeftType.ADALORA: AdaLoraConfig,
}

PEFT_INFORMATIONAL_KEYS = frozenset({"auto_mapping", "peft_version", "runtime_config"})
"""PEFT keys dropped whatever their value: they do not change what the adapter computes
(``runtime_config`` holds run-time-only settings, which PEFT itself drops when loading)."""

_PEFT_BASE = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": False,
    "peft_type": None,
    "peft_version": None,
    "revision": None,
    "task_type": None,
}
_PEFT_PROMPT_LEARNING = {
    **_PEFT_BASE,
    "modules_to_save": None,
    "num_attention_heads": None,
    "num_layers": None,
    "num_transformer_submodules": None,
    "num_virtual_tokens": None,
    "token_dim": None,
}

_PEFT_LORA = {
    **_PEFT_BASE,
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "runtime_config": {"ephemeral_gpu_offload": False},
    "target_modules": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

PEFT_FIELD_DEFAULTS: dict[PeftType, dict[str, Any]] = {
    PeftType.PREFIX_TUNING: {
        **_PEFT_PROMPT_LEARNING,
        "encoder_hidden_size": None,
        "init_weights": None,
        "prefix_projection": False,
    },
    PeftType.PROMPT_TUNING: {
        **_PEFT_PROMPT_LEARNING,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    },
    PeftType.P_TUNING: {
        **_PEFT_PROMPT_LEARNING,
        "encoder_dropout": 0.0,
        "encoder_hidden_size": None,
        "encoder_num_layers": 2,
        "encoder_reparameterization_type": "MLP",
    },
    PeftType.LORA: _PEFT_LORA,
    PeftType.ADALORA: {  # PEFT's AdaLoraConfig subclasses its LoraConfig
        **_PEFT_LORA,
        "beta1": 0.85,
        "beta2": 0.85,
        "deltaT": 1,
        "init_r": 12,
        "orth_reg_weight": 0.5,
        "rank_pattern": None,
        "target_r": 8,
        "tfinal": 0,
        "tinit": 0,
        "total_step": None,
    },
    PeftType.IA3: {
        **_PEFT_BASE,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": None,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "target_modules": None,
    },
}
"""Every key of PEFT 0.21's config class per method, with PEFT's default in JSON form
(``tests/checkpoint/test_checkpoint_core.py`` checks this table against the installed PEFT)."""


def config_class(peft_type: object) -> type[AdapterConfig]:
    """Our config class for a PEFT ``peft_type`` string.

    Raises:
        ValueError: a method this package does not implement (the message lists the supported ones).
    """
    supported = ", ".join(repr(t.value) for t in CONFIG_CLASSES)
    try:
        return CONFIG_CLASSES[PeftType(peft_type)]
    except (ValueError, TypeError):
        raise ValueError(f"peft_type={peft_type!r} is not supported; supported: {supported}") from None


def extra_field_names(cls: type[AdapterConfig]) -> tuple[str, ...]:
    """The fields of ``cls`` that PEFT's config has no key for (saved under ``"prefix_hooks"``)."""
    peft_type = PeftType(next(f for f in dataclasses.fields(cls) if f.name == "peft_type").default)
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in PEFT_FIELD_DEFAULTS[peft_type])


def config_to_json(config: AdapterConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` dict of ``config``.

    PEFT's keys sit at the top level; our other fields and ``format_version`` under
    ``"prefix_hooks"``. Values are JSON-ready (enums as strings, sets as sorted lists).
    """
    flat = {key: _json_ready(value) for key, value in config.to_dict().items()}
    extra_names = set(extra_field_names(type(config)))
    out = {key: value for key, value in flat.items() if key not in extra_names}
    out[EXTRA_CONFIG_KEY] = {"format_version": FORMAT_VERSION, **{k: v for k, v in flat.items() if k in extra_names}}
    return out


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Build our config from an ``adapter_config.json`` dict (PEFT's, ours) or a flat ``to_dict()``.

    Everything is checked before the config is built; unknown keys are warned about (one
    ``UserWarning`` naming them) only once the config is valid.

    Raises:
        ValueError: no or an unsupported ``peft_type``; a key with the wrong type; a PEFT key we
            cannot honour at a non-default value; our extra keys written by a newer format.
    """
    config, unknown = parse_config(data)
    warn_unknown_keys(config, unknown)
    return config


def warn_unknown_keys(config: AdapterConfig, unknown: list[str]) -> None:
    """One ``UserWarning`` naming the ``unknown`` keys of ``config``'s file (nothing if none)."""
    if unknown:
        warnings.warn(
            f"adapter config keys {sorted(unknown)} are unknown to prefix_hooks' {type(config).__name__} and are "
            "ignored (they may come from a newer PEFT version)",
            UserWarning,
            stacklevel=3,
        )


def parse_config(data: Mapping[str, Any]) -> tuple[AdapterConfig, list[str]]:
    """:func:`config_from_dict` without the warning: the config and the unknown keys it ignored.

    Used by loaders that warn only once the whole adapter has loaded.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"an adapter config must be a JSON object, got {type(data).__name__}")
    if "peft_type" not in data:
        raise ValueError(
            f"the adapter config has no 'peft_type' (keys: {sorted(data)}); it is not a PEFT adapter config"
        )
    cls = config_class(data["peft_type"])
    peft_defaults = PEFT_FIELD_DEFAULTS[PeftType(data["peft_type"])]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    extras = _extra_section(data)

    kwargs: dict[str, Any] = {}
    unknown: list[str] = []
    unsupported: list[str] = []
    for key, value in data.items():
        if key == EXTRA_CONFIG_KEY:
            continue
        if key in fields:
            kwargs[key] = value
        elif key in PEFT_INFORMATIONAL_KEYS:
            continue
        elif key in peft_defaults:
            if _json_ready(value) != peft_defaults[key]:
                unsupported.append(f"{key}={value!r} (PEFT's default: {peft_defaults[key]!r})")
        else:
            unknown.append(key)
    for key, value in extras.items():
        if key not in fields:
            continue  # codec-specific values (trainable form, ...), read by the codec
        if key in kwargs and _json_ready(kwargs[key]) != _json_ready(value):
            raise ValueError(
                f"{key} is given twice with different values: {kwargs[key]!r} at the top level and {value!r} "
                f"under {EXTRA_CONFIG_KEY!r}"
            )
        kwargs[key] = value
    if EXTRA_CONFIG_KEY not in data and "virtual_token_placement" in fields and "virtual_token_placement" not in data:
        kwargs["virtual_token_placement"] = "peft"  # a prompt PEFT trained: its layout reproduces PEFT's outputs
    if unsupported:
        raise ValueError(
            f"this {data['peft_type']} config uses PEFT options that prefix_hooks does not implement: "
            f"{', '.join(unsupported)}; only their defaults can be loaded"
        )
    for key, value in kwargs.items():
        if not _matches(value, hints[key]):
            raise ValueError(f"{key}={value!r} has the wrong type; expected {_describe(hints[key])}")
    return cls(**kwargs), unknown  # the class validates the values (ValueError naming them)


def _extra_section(data: Mapping[str, Any]) -> dict[str, Any]:
    extras = data.get(EXTRA_CONFIG_KEY, {})
    if not isinstance(extras, Mapping):
        raise ValueError(f"{EXTRA_CONFIG_KEY}={extras!r} is not accepted; expected a JSON object")
    version = extras.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{EXTRA_CONFIG_KEY}.format_version={version!r} is not accepted; expected an int >= 1")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"this adapter was saved with prefix_hooks format_version={version}; this version reads up to "
            f"{FORMAT_VERSION}: upgrade prefix_hooks"
        )
    return dict(extras)


def _json_ready(value: Any) -> Any:
    """``value`` as JSON would hold it: enums as values, sets as sorted lists, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_json_ready(item) for item in value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    return value


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (enum fields take their string values)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (hint, str))
    if origin in (list, set, tuple, frozenset):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple, set, frozenset)) and all(
            _matches(item, args[0] if args else Any) for item in value
        )
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return isinstance(value, Mapping) and all(
            _matches(k, key_hint) and _matches(v, value_hint) for k, v in value.items()
        )
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """A readable name of a field annotation: ``int | None``, ``list of str``, ..."""
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in typing.get_args(hint)))
    if origin in (list, set, tuple, frozenset):
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        args = typing.get_args(hint)
        return f"an object of {_describe(args[0])} -> {_describe(args[1])}" if args else "an object"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(member.value) for member in hint)
    if isinstance(hint, type):
        return {bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(hint, hint.__name__)
    return str(hint)
