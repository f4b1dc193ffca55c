"""LoRA layers: one wrapper per supported module type, holding several named adapters.

A :class:`LoraLayer` wraps ONE original module, kept as its child ``base_layer`` (the very
same object, so weight and bias tensors are shared, never copied), and computes::

    y = base_layer(x) + sum over active, unmerged adapters a of  B_a(A_a(dropout_a(x))) * scaling_a
    scaling_a = alpha_a / r_a            (alpha_a / sqrt(r_a) with use_rslora)

Parameter names and shapes are PEFT's (``lora_A.<name>.weight`` ``(r, in)``,
``lora_B.<name>.weight`` ``(out, r)``; Embedding: ``lora_embedding_A.<name>`` ``(r, V)`` and
``lora_embedding_B.<name>`` ``(D, r)``; Conv2d: A a ``k x k`` conv to ``r`` channels, B a
``1 x 1`` conv), so a PEFT state dict loads 1:1. Adapter parameters are float32 on the base
weight's device whatever the base dtype; the input is cast to float32 for the adapter path
and the sum is cast back to the base output's dtype (PEFT's default ``autocast_adapter_dtype``).

A DoRA adapter (``use_dora=True``, :mod:`prefix_hooks.lora.dora`) also holds a magnitude ``m``
per output feature and turns the layer into ``m / ||W + dW||_c * (W + dW)``; adapters apply in
the active order, each to the output so far (:mod:`prefix_hooks.lora.lora_layer`).

Merging folds the adapters into ``base_layer.weight`` in place (``W + dW``; DoRA:
``g * (W + dW)``) after saving a clone of the original; unmerging copies that clone back, so
the original weight returns bit for bit (no subtraction, which is not exact in low precision).

:class:`LoraLayer` (the adapters, the forward, merging) lives in :mod:`.lora_layer`, the layer of
each module type in :mod:`.layer_types`; :func:`wrap_module` picks the one for a module.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.lora.layer_types import LoraConv1D, LoraConv2d, LoraEmbedding, LoraLinear
from prefix_hooks.lora.lora_layer import ADAPTER_DTYPE, InitLoraWeights, LoraLayer

__all__ = [
    "ADAPTER_DTYPE",
    "InitLoraWeights",
    "LoraConv1D",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "wrap_module",
]


def _is_bitsandbytes_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "bitsandbytes"


def wrap_module(module: nn.Module) -> LoraLayer:
    """Wrap ``module`` in the LoRA layer for its type (no adapter yet; see :meth:`LoraLayer.add_adapter`).

    Supported: ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding``, ``nn.Conv2d`` (and
    their subclasses), and bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` when bitsandbytes
    is installed (see :mod:`prefix_hooks.lora.quantized`).

    Raises:
        TypeError: any other module type, or a module that already is a LoRA layer.
    """
    if isinstance(module, LoraLayer):
        raise TypeError(f"{type(module).__name__} is already a LoRA layer; call add_adapter on it instead")
    if _is_bitsandbytes_module(module):
        from prefix_hooks.lora.quantized import wrap_quantized

        return wrap_quantized(module)
    if isinstance(module, nn.Linear):
        return LoraLinear(module)
    if isinstance(module, Conv1D):
        return LoraConv1D(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise TypeError(
        f"LoRA cannot wrap a {type(module).__module__}.{type(module).__name__}; supported types: "
        "torch.nn.Linear, transformers Conv1D, torch.nn.Embedding, torch.nn.Conv2d "
        "(and bitsandbytes Linear8bitLt/Linear4bit when bitsandbytes is installed)"
    )
