"""LoRA over bitsandbytes' quantised linear layers (QLoRA): ``Linear8bitLt`` and ``Linear4bit``.

The base layer keeps computing its own quantised matmul; the adapter path runs in float32
on the unquantised input, as in PEFT's ``lora.bnb`` layers::

    y = base_layer(x) + B(A(dropout(x))) * scaling        # A: (r, in), B: (out, r), float32

Parameter names and shapes are those of :class:`prefix_hooks.lora.layer_types.LoraLinear`, so
PEFT QLoRA checkpoints load 1:1. Merging is not offered: folding a delta into a 4-/8-bit
weight means dequantising, adding and quantising again, which changes the base weight by
more than the delta and cannot be done in place; the unmerged forward is exact. Per-row
adapter selection, dropout, several adapters and DoRA (its norms taken of the dequantised
weight, as PEFT does) work as for the other layers.

Importing this module imports bitsandbytes; :func:`prefix_hooks.lora.layers.wrap_module`
imports it only when it meets a bitsandbytes module.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from prefix_hooks.lora.layer_types import LinearFactorsLayer
from prefix_hooks.lora.lora_layer import LoraLayer

QUANTIZED_TYPES: tuple[type[nn.Module], ...] = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
"""The bitsandbytes layer types LoRA can wrap."""


class _QuantizedLinearLayer(LinearFactorsLayer):
    """A Linear-shaped LoRA layer whose base weight is quantised (no merging)."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def _check_mergeable(self) -> None:
        raise ValueError(
            f"cannot merge LoRA into a bitsandbytes {type(self.base_layer).__name__}: the weight would have to be "
            "dequantised and quantised again, which is lossy and not reversible in place; keep the adapter "
            "unmerged (its forward is exact) or dequantise the model before merging"
        )


class LoraLinear8bitLt(_QuantizedLinearLayer):
    """LoRA over ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())."""

    def _dense_weight(self) -> torch.Tensor:
        weight = self.base_weight()  # int8 (out, in), one scale per row
        scales = getattr(self.base_layer.state, "SCB", None)
        if scales is None:
            scales = weight.SCB  # type: ignore[attr-defined]  # Int8Params keeps them until the first forward
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))  # (out, in)


class LoraLinear4bit(_QuantizedLinearLayer):
    """LoRA over ``bitsandbytes.nn.Linear4bit`` (NF4/FP4, QLoRA)."""

    def _dense_weight(self) -> torch.Tensor:
        weight = self.base_weight()  # packed 4-bit; dequantised: (out, in)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]


def wrap_quantized(module: nn.Module) -> LoraLayer:
    """Wrap a bitsandbytes ``Linear8bitLt`` or ``Linear4bit`` (no adapter yet).

    Raises:
        TypeError: any other bitsandbytes module.
    """
    if isinstance(module, bnb.nn.Linear8bitLt):
        return LoraLinear8bitLt(module)
    if isinstance(module, bnb.nn.Linear4bit):
        return LoraLinear4bit(module)
    raise TypeError(
        f"LoRA cannot wrap bitsandbytes {type(module).__name__}; supported bitsandbytes types: Linear8bitLt, Linear4bit"
    )
