"""AdaLoRA's SVD-form layers: a LoRA layer whose update is ``B diag(E) A`` divided by the initial rank.

For an adapter of rank ``r`` over a module with ``in`` inputs and ``out`` outputs::

    y = base_layer(x) + (dropout(x) @ (A * E).T @ B.T) * lora_alpha / (ranknum + 1e-5)

    A: (r, in)    right singular vectors        lora_A.<adapter>
    E: (r, 1)     singular values               lora_E.<adapter>
    B: (out, r)   left singular vectors         lora_B.<adapter>
    ranknum: (1,) the initial rank init_r, a frozen float (PEFT's constant; not saved)

Names, shapes, dtypes (float32) and the order of the random draws are PEFT's, so a PEFT state
dict loads by key and the same seed gives PEFT's initial values on CPU. Pruning a triplet sets
``E_i = 0`` (see :mod:`prefix_hooks.lora.adalora.allocator`); loading an allocated checkpoint
keeps only the kept rows (:meth:`SvdLayer.keep_rows`) while ``ranknum`` stays ``init_r``, as PEFT.

Everything else (several adapters, per-thread ``disabled()``, per-row ``adapter_names``, merging by
saving and copying back the original weight) is :class:`~prefix_hooks.lora.lora_layer.LoraLayer`'s.
The merged delta weight is ``B @ (A * E) * lora_alpha / (ranknum + 1e-5)`` in the base weight's layout.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.lora.adalora.config import AdaLoraConfig
from prefix_hooks.lora.layers import _is_bitsandbytes_module as is_bitsandbytes_module
from prefix_hooks.lora.lora_layer import ADAPTER_DTYPE, InitLoraWeights, LoraLayer, as_dtype

__all__ = ["RANKNUM_EPS", "SvdConv1D", "SvdLayer", "SvdLinear", "wrap_svd_module"]

RANKNUM_EPS = 1e-5
"""Added to ``ranknum`` in the denominator, as PEFT does."""

INIT_STD = 0.02
"""Std of the normal initialisation of ``A`` and ``B`` (PEFT's)."""


class FactorDict(nn.ParameterDict):
    """A ``ParameterDict`` that takes tensors only.

    A LoRA adapter lent to a layer AdaLoRA made would put its ``nn.Linear`` factors here; this
    refuses them while attaching (the attach is then undone), since the two cannot share a module.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"cannot add adapter {key!r} ({type(value).__name__} factors) to a module that holds AdaLoRA adapters: "
                "LoRA and AdaLoRA adapters cannot share a target module (PEFT cannot mix them either); target other "
                "modules, or detach the AdaLoRA adapters first"
            )
        super().__setitem__(key, value)


class SvdLayer(LoraLayer):
    """Base of the AdaLoRA layers; see the module docstring for the maths.

    Attributes:
        lora_A, lora_B, lora_E, ranknum: adapter name -> ``nn.Parameter`` (``ParameterDict``s, so the
            in-model names are PEFT's ``<target>.lora_A.<adapter>``).
        scaling: adapter name -> ``lora_alpha`` (PEFT's AdaLoRA divides by ``ranknum`` instead of ``r``).
    """

    in_features: int
    out_features: int

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # same keys and places in _modules as LoraLayer's, so parameters list A, B, E, ranknum as in PEFT
        self.lora_A = FactorDict()  # type: ignore[assignment]  # parameters, not factor modules
        self.lora_B = FactorDict()  # type: ignore[assignment]
        self.lora_E = FactorDict()
        self.ranknum = FactorDict()

    def add_svd_adapter(self, name: str, config: AdaLoraConfig) -> None:
        """Add adapter ``name`` of rank ``config.init_r`` (see :meth:`LoraLayer.add_adapter` for the checks)."""
        self.add_adapter(
            name,
            r=config.init_r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            init_lora_weights=bool(config.init_lora_weights),  # PEFT: any truthy value is AdaLoRA's init
        )

    def add_adapter(self, name: str, r: int, alpha: float, *args: Any, **kwargs: Any) -> None:
        """:meth:`LoraLayer.add_adapter` (the same arguments) with AdaLoRA's scaling: ``alpha``, divided by
        ``ranknum`` in the forward.

        Raises:
            ValueError: ``use_rslora=True`` or ``use_dora=True`` (AdaLoRA has neither), or what
                :meth:`LoraLayer.add_adapter` raises; nothing is changed.
        """
        arguments = inspect.signature(LoraLayer.add_adapter).bind(self, name, r, alpha, *args, **kwargs).arguments
        if arguments.get("use_rslora"):
            raise ValueError("use_rslora=True is not accepted: AdaLoRA scales its update by lora_alpha / ranknum")
        super().add_adapter(name, r, alpha, *args, **kwargs)
        self.scaling[name] = alpha

    def _check_dora(self, name: str) -> None:
        raise ValueError(f"use_dora=True is not accepted for adapter {name!r}: ADALORA does not support DoRA")

    def factor_dicts(self) -> tuple[FactorDict, FactorDict, FactorDict]:
        """The containers of ``A``, ``E`` and ``B`` (adapter name -> parameter)."""
        return cast(FactorDict, self.lora_A), self.lora_E, cast(FactorDict, self.lora_B)

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """``(A (r, in), E (r, 1), B (out, r))`` of adapter ``name``."""
        a_dict, e_dict, b_dict = self.factor_dicts()
        return a_dict[name], e_dict[name], b_dict[name]

    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        # drawn on the CPU in PEFT's order (A, E, B, then ranknum's placeholder), then moved
        a_weight = torch.randn(r, self.in_features, dtype=ADAPTER_DTYPE)  # (r, in)
        e_weight = torch.randn(r, 1, dtype=ADAPTER_DTYPE)  # (r, 1)
        b_weight = torch.randn(self.out_features, r, dtype=ADAPTER_DTYPE)  # (out, r)
        ranknum = torch.randn(1, dtype=ADAPTER_DTYPE).fill_(float(r))  # (1,)
        if init_lora_weights:
            nn.init.zeros_(e_weight)
            nn.init.normal_(a_weight, mean=0.0, std=INIT_STD)
            nn.init.normal_(b_weight, mean=0.0, std=INIT_STD)
        device = self._weight_device()
        for factors, values in zip(self.factor_dicts(), (a_weight, e_weight, b_weight)):
            factors[name] = nn.Parameter(values.to(device))
        self.ranknum[name] = nn.Parameter(ranknum.to(device), requires_grad=False)

    def _delete_factors(self, name: str) -> None:
        for factors in (*self.factor_dicts(), self.ranknum):
            del factors[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """``[A, B, E]`` of adapter ``name`` (``ranknum`` is a constant)."""
        self._check_known(name)
        a_weight, e_weight, b_weight = self.factors(name)
        return [a_weight, b_weight, e_weight]

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a_weight, e_weight, b_weight = self.factors(name)
        x = as_dtype(x, a_weight.dtype)
        update = self.lora_dropout[name](x) @ (a_weight * e_weight).T @ b_weight.T  # (..., out)
        return update * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)  # PEFT's order: the allocation compares scores exactly

    def _delta_weight(self, name: str) -> torch.Tensor:
        a_weight, e_weight, b_weight = self.factors(name)
        return b_weight @ (a_weight * e_weight) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)  # (out, in)

    def keep_rows(self, name: str, kept: Sequence[bool]) -> None:
        """Keep only the triplets ``i`` with ``kept[i]``: ``A[kept]``, ``E[kept]``, ``B[:, kept]``, as new
        parameters (same ``requires_grad``); ``ranknum`` keeps its value, so the scale is unchanged.

        Raises:
            ValueError: ``kept`` does not have one entry per current row, or the adapter is merged.
        """
        self._check_known(name)
        a_weight, e_weight, b_weight = self.factors(name)
        if len(kept) != e_weight.shape[0]:
            raise ValueError(
                f"keep_rows got {len(kept)} flags for adapter {name!r}, which has {e_weight.shape[0]} triplets"
            )
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; call unmerge() before resizing it")
        mask = torch.tensor(list(kept), dtype=torch.bool, device=e_weight.device)  # (r,)
        kept_values = (a_weight[mask], e_weight[mask], b_weight[:, mask])  # (r', in), (r', 1), (out, r')
        for factors, old, values in zip(self.factor_dicts(), (a_weight, e_weight, b_weight), kept_values):
            factors[name] = nn.Parameter(values.detach().clone(), requires_grad=old.requires_grad)
        self.r[name] = int(mask.sum())


class SvdLinear(SvdLayer):
    """AdaLoRA over ``nn.Linear`` (weight ``(out, in)``), bitsandbytes' quantised linears included;
    ``in_features`` / ``out_features`` are the base layer's."""


class SvdConv1D(SvdLayer):
    """AdaLoRA over transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``: the delta is transposed."""

    def __init__(self, base_layer: Conv1D) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    def _delta_weight(self, name: str) -> torch.Tensor:
        return super()._delta_weight(name).T  # (in, out)


SVD_LAYERS: tuple[tuple[type[nn.Module], type[SvdLayer]], ...] = ((nn.Linear, SvdLinear), (Conv1D, SvdConv1D))
"""Module type -> its AdaLoRA layer, the first matching entry wins (subclasses included)."""


def wrap_svd_module(module: nn.Module) -> SvdLayer:
    """Wrap ``module`` in the AdaLoRA layer for its type (no adapter yet; see :meth:`SvdLayer.add_svd_adapter`).

    Supported: :data:`SVD_LAYERS`, and bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` when bitsandbytes
    is installed (no merging there). PEFT's AdaLoRA does not adapt embeddings either.

    Raises:
        TypeError: any other module type, or a module that already is a LoRA layer.
    """
    if isinstance(module, LoraLayer):
        raise TypeError(f"{type(module).__name__} is already a LoRA layer; add the adapter to it instead")
    layers = SVD_LAYERS
    if is_bitsandbytes_module(module):
        from prefix_hooks.lora.adalora.quantized import QUANTIZED_SVD_LAYERS

        layers = QUANTIZED_SVD_LAYERS
    for base_type, layer_type in layers:
        if isinstance(module, base_type):
            return layer_type(module)
    raise TypeError(
        f"AdaLoRA cannot adapt a {type(module).__module__}.{type(module).__name__}; supported types: torch.nn.Linear, "
        "transformers Conv1D (and bitsandbytes Linear8bitLt/Linear4bit when bitsandbytes is installed)"
    )
