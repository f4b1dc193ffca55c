"""The adapters ``python -m prefix_hooks.check`` attaches: one per method, each with weights that clearly
change the output (a freshly initialised adapter may be a no-op), and the cells refused by design."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prefix_hooks.core.attachment import Attachment
from prefix_hooks.ia3 import IA3Config, attach_ia3
from prefix_hooks.lora import LoraConfig, attach_lora
from prefix_hooks.prefix import PrefixTuningConfig, attach_prefix
from prefix_hooks.prompt import PromptEncoderConfig, PromptTuningConfig, attach_prompt


def normal_weights(module: nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Overwrite every parameter of ``module`` with N(0, ``scale``^2) draws from ``generator``, in
    parameter order (the tests randomise their prefixes and prompts the same way)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _prefix(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
    normal_weights(handle.encoder, generator)
    return handle


def _lora(model: nn.Module, generator: torch.Generator) -> Attachment:
    # init_lora_weights=False: B is not zero, so the adapter is not a no-op from the start
    return attach_lora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))


def _prompt(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3))
    normal_weights(handle.prompt_encoder, generator)
    return handle


def _p_tuning(model: nn.Module, generator: torch.Generator) -> Attachment:
    # the MLP's default (random) init already gives a prompt that matters
    return attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16))


def _ia3(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_ia3(model, IA3Config())
    with torch.no_grad():  # 1 + N(0, 0.5^2): each vector clearly rescales
        for _, vector in handle.named_parameters():
            vector.copy_(1 + 0.5 * torch.randn(vector.shape, generator=generator))
    return handle


ADAPTERS: dict[str, Callable[[nn.Module, torch.Generator], Attachment]] = {
    "prefix": _prefix,
    "lora": _lora,
    "prompt": _prompt,
    "p-tuning": _p_tuning,
    "ia3": _ia3,
}
"""Method -> builds its (not yet attached) adapter on a model, with weights that matter."""

METHODS: tuple[str, ...] = tuple(ADAPTERS)

REFUSED: dict[str, frozenset[str]] = {
    # prompt methods prepend token embeddings: no token inputs (vision, speech), or llava's
    # image placeholders, which a prepended prompt would misalign
    "prompt": frozenset({"vit", "deit", "dinov2", "whisper", "llava"}),
    "p-tuning": frozenset({"vit", "deit", "dinov2", "whisper", "llava"}),
}
"""Method -> families it refuses by design, with a ``ValueError`` raised before touching the model."""
