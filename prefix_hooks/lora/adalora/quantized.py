"""AdaLoRA over bitsandbytes' quantised linear layers: ``Linear8bitLt`` and ``Linear4bit``.

The base layer computes its own quantised matmul; the SVD update runs in float32 on the
unquantised input (:class:`~prefix_hooks.lora.adalora.layers.SvdLinear`'s forward), as in PEFT's
``adalora.bnb`` layers. Merging is refused for the reason LoRA refuses it
(:mod:`prefix_hooks.lora.quantized`): it could not be undone exactly.

Importing this module imports bitsandbytes; :func:`~prefix_hooks.lora.adalora.layers.wrap_svd_module`
imports it only when it meets a bitsandbytes module.
"""

from __future__ import annotations

import bitsandbytes as bnb
from torch import nn

from prefix_hooks.lora.adalora.layers import SvdLayer, SvdLinear
from prefix_hooks.lora.quantized import _QuantizedLinearLayer


class _QuantizedSvdLinear(SvdLinear):
    """An AdaLoRA linear layer whose base weight is quantised (no merging)."""

    _check_mergeable = _QuantizedLinearLayer._check_mergeable  # the one refusal, with LoRA's message


class SvdLinear8bitLt(_QuantizedSvdLinear):
    """AdaLoRA over ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())."""


class SvdLinear4bit(_QuantizedSvdLinear):
    """AdaLoRA over ``bitsandbytes.nn.Linear4bit`` (NF4/FP4)."""


QUANTIZED_SVD_LAYERS: tuple[tuple[type[nn.Module], type[SvdLayer]], ...] = (
    (bnb.nn.Linear8bitLt, SvdLinear8bitLt),
    (bnb.nn.Linear4bit, SvdLinear4bit),
)
"""bitsandbytes module type -> its AdaLoRA layer (see :func:`~prefix_hooks.lora.adalora.layers.wrap_svd_module`)."""
