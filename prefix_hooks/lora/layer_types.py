"""The LoRA layer of each supported module type: how ``A`` and ``B`` are shaped, run and folded.

Parameter names and shapes are PEFT's, so a PEFT state dict loads 1:1:

* ``nn.Linear`` (weight ``(out, in)``) and transformers ``Conv1D`` (weight ``(in, out)``):
  ``lora_A.<name>.weight`` ``(r, in)``, ``lora_B.<name>.weight`` ``(out, r)``;
* ``nn.Embedding``: ``lora_embedding_A.<name>`` ``(r, V)``, ``lora_embedding_B.<name>`` ``(D, r)``;
* ``nn.Conv2d``: A a ``k x k`` conv to ``r`` channels, B a ``1 x 1`` conv;
* a DoRA adapter adds ``lora_magnitude_vector.<name>.weight``: ``(out,)``, ``(D,)`` for
  Embedding, ``(1, out, 1, 1)`` for Conv2d.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.lora.dora import column_norm
from prefix_hooks.lora.lora_layer import ADAPTER_DTYPE, InitLoraWeights, LoraLayer, weight_of


class LinearFactorsLayer(LoraLayer):
    """Shared part of the Linear-like layers: ``A = Linear(in, r)``, ``B = Linear(r, out)``, no biases."""

    in_features: int
    out_features: int

    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        device = self._weight_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self._init_linear_factors(name, init_lora_weights)

    def _delta_weight(self, name: str) -> torch.Tensor:
        delta = weight_of(self.lora_B[name]) @ weight_of(self.lora_A[name])  # (out, in)
        return delta * self.scaling[name]

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._dense_weight().to(x.dtype))  # (..., out)


class LoraLinear(LinearFactorsLayer):
    """LoRA over ``nn.Linear`` (weight ``(out, in)``): ``A = Linear(in, r)``, ``B = Linear(r, out)``, no biases."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features


class LoraConv1D(LinearFactorsLayer):
    """LoRA over transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``.

    The factors are PEFT's Linear ones; only :meth:`delta_weight` is transposed to the
    ``(in, out)`` layout (PEFT's ``fan_in_fan_out=True``, here implied by the type).
    """

    _out_axis = 1

    def __init__(self, base_layer: Conv1D) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    def _delta_weight(self, name: str) -> torch.Tensor:
        return super()._delta_weight(name).T  # (in, out)

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._dense_weight().to(x.dtype)  # (..., in) @ (in, out)

    def _column_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # Summed in the (out, in) layout of B @ A, contiguous, the norm reduces along memory: 3x faster
        # than over the (in, out) sum (PEFT's), equal within float rounding.
        delta = LinearFactorsLayer._delta_weight(self, name)  # (out, in), float32, contiguous
        return column_norm(torch.add(delta, weight.to(delta.device, delta.dtype).T), 0)  # (out,)


class LoraEmbedding(LoraLayer):
    """LoRA over ``nn.Embedding``: ``lora_embedding_A`` ``(r, V)``, ``lora_embedding_B`` ``(D, r)``.

    The update for token ids ``x`` is ``embedding(x, A.T) @ B.T * scaling`` with the base
    layer's ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and ``sparse``
    (as PEFT; ``max_norm`` renormalises the looked-up columns of A in place, as F.embedding
    does). The base layer's scalar ``embed_scale`` (e.g. Gemma) multiplies the update too.
    Dropout is not applied to token ids (PEFT's behaviour). A DoRA magnitude is ``(D,)``: the
    norm of each embedding dimension over the vocabulary.
    """

    _out_axis = 1
    _drops_input = False

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        del self.lora_magnitude_vector  # registered again after the factors: PEFT's state-dict order
        self.lora_magnitude_vector = nn.ModuleDict()
        self.in_features = base_layer.num_embeddings
        self.out_features = base_layer.embedding_dim
        embed_scale = getattr(base_layer, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor) and embed_scale.numel() != 1:
            raise ValueError(
                f"{type(base_layer).__name__}.embed_scale has shape {tuple(embed_scale.shape)}; "
                "LoRA supports a scalar embed_scale only"
            )

    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        device = self._weight_device()
        a_weight = torch.randn((r, self.in_features), device=device, dtype=ADAPTER_DTYPE)  # (r, V)
        b_weight = torch.randn((self.out_features, r), device=device, dtype=ADAPTER_DTYPE)  # (D, r)
        if init_lora_weights is not False:
            nn.init.zeros_(a_weight)
            nn.init.normal_(b_weight)
        self.lora_embedding_A[name] = nn.Parameter(a_weight)
        self.lora_embedding_B[name] = nn.Parameter(b_weight)

    def _delete_factors(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        self._check_known(name)
        return [self.lora_embedding_A[name], self.lora_embedding_B[name], *self._magnitude_parameters(name)]

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = cast(nn.Embedding, self.base_layer)
        after_a = F.embedding(
            x,
            self.lora_embedding_A[name].T,  # (V, r)
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )  # (..., r)
        out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., D)
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            out = out * torch.as_tensor(embed_scale, device=out.device).to(out.dtype)
        return out

    def _delta_weight(self, name: str) -> torch.Tensor:
        delta = self.lora_embedding_B[name] @ self.lora_embedding_A[name]  # (D, V)
        return delta.T * self.scaling[name]  # (V, D)


class LoraConv2d(LoraLayer):
    """LoRA over ``nn.Conv2d``.

    ``A = Conv2d(in, r, kernel, stride, padding, dilation, padding_mode)`` (no bias) and
    ``B = Conv2d(r, out, 1, groups=groups)`` (no bias): the base conv's geometry lives in A,
    so ``B(A(x))`` equals a convolution with weight ``B @ A`` reshaped to ``(out, in, kh, kw)``
    (the two-convolution identity), which is what :meth:`delta_weight` returns. Parameter
    shapes are PEFT's; unlike PEFT, A also takes the base's dilation and padding mode (PEFT
    ignores them, which breaks dilated convs). With ``groups > 1`` the rank must be divisible
    by ``groups`` and the layer cannot be merged (as PEFT) nor hold a DoRA adapter.
    """

    _output_view = (1, -1, 1, 1)

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def _check_rank(self, name: str, r: int) -> None:
        groups = cast(nn.Conv2d, self.base_layer).groups
        if r % groups != 0:
            raise ValueError(f"r={r} for adapter {name!r} must be divisible by the Conv2d's groups={groups}")

    def _check_dora(self, name: str) -> None:
        super()._check_dora(name)
        groups = cast(nn.Conv2d, self.base_layer).groups
        if groups > 1:
            raise ValueError(
                f"use_dora=True for adapter {name!r} is not supported on a Conv2d with groups={groups}: its LoRA "
                "update is not a grouped convolution, so W + scaling * B @ A, whose norm DoRA needs, does not exist "
                "(PEFT computes it from a reshaped, meaningless matrix); use plain LoRA here or exclude this module"
            )

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        base = cast(nn.Conv2d, self.base_layer)
        return base._conv_forward(x, self._dense_weight().to(x.dtype), None)  # (B, out, H', W')

    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        base = cast(nn.Conv2d, self.base_layer)
        device = self._weight_device()
        self.lora_A[name] = nn.Conv2d(
            self.in_features,
            r,
            cast(tuple[int, int], base.kernel_size),
            cast(tuple[int, int], base.stride),
            cast(tuple[int, int], base.padding),  # or "same"/"valid", as the base has it
            cast(tuple[int, int], base.dilation),
            bias=False,
            padding_mode=base.padding_mode,
            device=device,
            dtype=ADAPTER_DTYPE,
        )
        self.lora_B[name] = nn.Conv2d(
            r, self.out_features, 1, 1, groups=base.groups, bias=False, device=device, dtype=ADAPTER_DTYPE
        )
        self._init_linear_factors(name, init_lora_weights)

    def _check_mergeable(self) -> None:
        groups = cast(nn.Conv2d, self.base_layer).groups
        if groups > 1:
            raise ValueError(
                f"a LoRA Conv2d over a conv with groups={groups} cannot be merged "
                "(its update is not a grouped convolution)"
            )

    def _delta_weight(self, name: str) -> torch.Tensor:
        self._check_mergeable()
        a_weight = weight_of(self.lora_A[name])  # (r, in, kh, kw)
        b_weight = weight_of(self.lora_B[name])  # (out, r, 1, 1)
        delta = b_weight.flatten(1) @ a_weight.flatten(1)  # (out, in * kh * kw)
        return delta.view(self.out_features, *a_weight.shape[1:]) * self.scaling[name]  # (out, in, kh, kw)

