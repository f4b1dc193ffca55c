"""State-dict checks shared by the checkpoint codecs: every key, shape and dtype is checked
before anything is copied, and configs are put in the form a loaded adapter uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

import torch

from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.lora.config import LoraConfig

ConfigT = TypeVar("ConfigT", LoraConfig, IA3Config)


def loading_config(config: ConfigT, trainable: bool) -> ConfigT:
    """``config`` as a loaded adapter uses it: ``inference_mode`` becomes ``not trainable`` (PEFT's
    ``is_trainable``).

    Everything else stays as saved, ``modules_to_save`` included, so the adapter saves the same
    config again. The task heads PEFT writes into ``modules_to_save`` (``["classifier", "score"]``
    for ``SEQ_CLS``) may match nothing there (see ``select_modules_to_save``).
    """
    return dataclasses.replace(config, inference_mode=not trainable)


def check_state_dict(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise unless ``given`` has exactly the keys of ``expected``, each a floating tensor of its shape.

    Args:
        given: the tensors read from a checkpoint.
        expected: key -> the tensor the value will be copied into.
        what: names the adapter in messages (``"LoRA adapter 'default'"``).

    Raises:
        ValueError: naming the missing / unexpected keys (up to 8 each), or the key, its shape
            or dtype and the expected one.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit {what} built for this model: missing keys {some(missing)}, unexpected keys "
            f"{some(unexpected)}; was it saved for another model or another config (targets, modules_to_save)?"
        )
    for key, target in expected.items():
        tensor = given[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}; {what} needs {tuple(target.shape)} "
                "(a different rank, model size or config?)"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint tensor {key!r} has dtype {tensor.dtype}; expected a floating-point dtype")


def some(keys: list[str]) -> str:
    """Up to 8 of ``keys`` for an error message."""
    return f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"


def copy_into(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Copy each ``given[key]`` into ``expected[key]`` in place (cast to its dtype and device)."""
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(given[key])


def cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies: later training does not change what was saved."""
    return {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in tensors.items()}
