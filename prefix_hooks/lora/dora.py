"""DoRA (Liu et al., 2024): the magnitude vector and the weight-decomposed update of a LoRA adapter.

A DoRA adapter keeps LoRA's factors and adds a trainable magnitude ``m``, one value per output
feature of the base weight ``W``. With ``dW = scaling * B @ A`` in ``W``'s layout, the adapted
weight is::

    W' = m / ||W + dW||_c * (W + dW)          ||.||_c: L2 norm over every axis but the output one

(the paper stores weights as (in, out), so its "column" norm is our norm per output feature).
``g = m / ||W + dW||_c`` is one factor per output feature; the norm is computed without
gradient, as the paper's section 4.3 advises (PEFT does the same), so ``m`` and the factors
train and the norm follows them as a constant.

The unmerged forward adds, for an input ``x`` and the output so far ``y`` (bias included)::

    y' = y + (g - 1) * (y - bias) + g * scaling * B(A(x))                   (= g (W + dW) x + bias)

With dropout active (training, ``p > 0``) the base term is recomputed on the dropped-out input,
as PEFT does: ``y' = y + (g - 1) * W drop(x) + g * scaling * B(A(drop(x)))``. Several DoRA
adapters apply in turn, each to the output accumulated so far, which is what merging them one
after another gives (``W <- g_a (W + dW_a)``, then ``g_b`` on that, every norm taken of the
unmerged ``W``); see :mod:`prefix_hooks.lora.lora_layer`.

Shapes (PEFT's): the magnitude is ``(out,)`` for Linear, Conv1D and Embedding (``(D,)``) and
``(1, out, 1, 1)`` for Conv2d, i.e. shaped to broadcast over the layer's output.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoraMagnitude", "added_output", "column_norm", "magnitude_scale", "merged_weight"]


class DoraMagnitude(nn.Module):
    """The magnitude ``m`` of one DoRA adapter on one layer, as PEFT holds it.

    PEFT keeps it as ``lora_magnitude_vector.<adapter>.weight`` (a module with one parameter),
    so the in-model names and state-dict keys are PEFT's.

    Args:
        magnitude: the initial value (copied), shaped to broadcast over the layer's output.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude.detach().clone())


def column_norm(weight: torch.Tensor, out_axis: int) -> torch.Tensor:
    """``||weight||_c``: the L2 norm over every axis of ``weight`` but ``out_axis``, ``(out,)``.

    Args:
        weight: ``W + dW`` in the base weight's layout (``(out, in)``, Conv1D ``(in, out)``,
            Embedding ``(V, D)``, Conv2d ``(out, in, kh, kw)``).
        out_axis: the axis of the output features (0, or 1 for Conv1D and Embedding).
    """
    dims = [axis for axis in range(weight.dim()) if axis != out_axis]
    return torch.linalg.vector_norm(weight, dim=dims)  # (out,)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / ||W + dW||_c`` in the magnitude's shape; ``norm`` ``(out,)`` is detached here."""
    return magnitude / norm.detach().view(magnitude.shape)


def added_output(scale: torch.Tensor, base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """What a DoRA adapter adds to a layer's output: ``(g - 1) * base + g * update``.

    Args:
        scale: ``g``, broadcasting over the output (``(out,)`` or ``(1, out, 1, 1)``).
        base: ``W x`` without bias (the output so far minus the bias, or recomputed on the
            dropped-out input), shaped like the output.
        update: ``scaling * B(A(x))``, shaped like the output.
    """
    return (scale - 1) * base + scale * update


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, out_axis: int) -> torch.Tensor:
    """``g * (weight + delta)`` with ``g`` laid along ``out_axis`` of ``weight`` (float32 or wider).

    Args:
        weight: the base weight now (it may hold earlier merged adapters), any float dtype.
        delta: ``scaling * B @ A`` in ``weight``'s layout, float32.
        scale: ``g`` from :func:`magnitude_scale`, computed from the unmerged weight.
        out_axis: the axis of the output features in ``weight``.
    """
    shape = [1] * weight.dim()
    shape[out_axis] = -1
    return scale.reshape(shape) * (weight + delta)  # promotes a bf16/fp16 weight to float32
