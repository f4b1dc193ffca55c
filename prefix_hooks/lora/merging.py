"""Folding one LoRA adapter into the shared layers' base weights, and taking it out again.

A LoRA layer holds several adapters and restores its weight by copying back the clone it took
before the first merge (:meth:`~prefix_hooks.lora.layers.LoraLayer.unmerge`: all or nothing).
To take one adapter out, or to bake one in for good, the layer is unmerged and the other
merged adapters are merged again (:func:`others_kept_merged`). LoRA also tells
:mod:`prefix_hooks.core.merged_weights` which originals hold a merged LoRA update, so another
method does not merge over it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.merged_weights import register_merge_probe
from prefix_hooks.lora.layers import LoraLayer


@contextlib.contextmanager
def others_kept_merged(layer: LoraLayer, name: str) -> Iterator[torch.Tensor]:
    """Inside: ``layer``'s base weight is its original (yielded); after: the merged adapters but ``name`` are merged again."""
    others = [other for other in layer.merged_adapters if other != name]
    layer.unmerge()  # copies the saved original back: bit-exact
    yield layer.base_weight()
    if others:
        layer.merge(others)


def unmerge_adapter(layers: Sequence[LoraLayer], name: str) -> None:
    """Take adapter ``name`` out of each layer's weight; other merged adapters stay merged."""
    for layer in layers:
        with others_kept_merged(layer, name):
            pass


def bake_adapter(layers: Sequence[LoraLayer], name: str) -> None:
    """Fold adapter ``name`` into each layer's original weight for good (it must not be merged):
    ``W + dW``, or ``g * (W + dW)`` for DoRA (:meth:`LoraLayer.fold`)."""
    for layer in layers:
        with others_kept_merged(layer, name) as weight:
            layer.fold(name, weight)  # the new base weight


def _merged_lora(model: nn.Module, module: nn.Module) -> str | None:
    """The merge probe of LoRA: whether a LoRA layer of ``model`` wrapping ``module`` has merged adapters."""
    state = swaps.state_of(model)
    for swap in state.swaps.values() if state is not None else ():
        if swap.original is module and isinstance(swap.replacement, LoraLayer) and swap.replacement.is_merged:
            return "a merged LoRA update"
    return None


register_merge_probe("LoRA", _merged_lora)
