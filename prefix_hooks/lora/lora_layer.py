"""The base of every LoRA layer: a wrapper of ONE original module holding several named adapters.

:class:`LoraLayer` keeps the adapters' bookkeeping (rank, alpha, scaling, active and merged
ones), the forward (all active adapters, or one per batch row) and merging; the layer of each
module type (:mod:`prefix_hooks.lora.layer_types`) says how its factors ``A`` and ``B`` are
shaped, run and turned into a delta weight. The maths is in :mod:`prefix_hooks.lora.layers`;
a DoRA adapter (``use_dora=True``) also holds a magnitude, see :mod:`prefix_hooks.lora.dora`.

Adapters apply in the active order, each to the output accumulated so far. A plain LoRA
adapter adds ``scaling * B(A(dropout(x)))`` whatever came before; a DoRA adapter rescales the
output so far (per output feature) and adds its scaled update, which is what merging the
adapters in that order gives. Merged adapters are in the weight, so they act first.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from prefix_hooks.core.devices import offload_aware_device
from prefix_hooks.core.rows import BASE_ROW, current_adapter_rows
from prefix_hooks.core.switch import Switch, switched_off
from prefix_hooks.lora.config import check_init_lora_weights, check_lora_numbers, lora_scaling
from prefix_hooks.lora.dora import DoraMagnitude, added_output
from prefix_hooks.lora.weight_merging import WeightMerging

InitLoraWeights = bool | Literal["gaussian"]
"""``True``: A Kaiming-uniform, B zero; ``"gaussian"``: A normal(std=1/r), B zero; ``False``: both random.

Embedding adapters follow PEFT: ``True``/``"gaussian"`` give A zero and B standard normal.
"""

ADAPTER_DTYPE = torch.float32
"""Dtype of every adapter parameter."""


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight``, which must be a tensor."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is {type(weight).__name__}, not a tensor")
    return weight


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``; no operator at all when it already is (``Tensor.to`` dispatches one)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class LoraLayer(WeightMerging):
    """Base of the LoRA wrappers; see the module docstring for the maths.

    Attributes:
        base_layer: the wrapped original module (same object, shared tensors).
        lora_A, lora_B: ``nn.ModuleDict`` adapter name -> factor module (empty for Embedding).
        lora_dropout: adapter name -> ``nn.Dropout`` (``nn.Identity`` for dropout 0).
        lora_magnitude_vector: adapter name -> :class:`~prefix_hooks.lora.dora.DoraMagnitude`,
            for the DoRA adapters only.
        r, lora_alpha, scaling: adapter name -> rank, alpha, ``alpha / r`` (or ``/ sqrt(r)``).
        active_adapters: the adapters added to the output (default: every added adapter,
            in the order they were added).
        switches: adapter name -> its handle's :class:`~prefix_hooks.core.switch.Switch`, which
            ``disabled()`` turns off in one thread / async task; an adapter without one is
            never switched off that way.
        disabled: when True the forward is exactly ``base_layer(x)`` in every thread (merged
            adapters are unmerged first, as PEFT does).
        merged_adapters: adapters currently folded into ``base_layer.weight``.

    Attributes this class does not define (``weight``, ``bias``, ``in_features``,
    ``padding_idx``, ...) are read from ``base_layer``, so model code that inspects the
    original module keeps working.

    Class attributes (per module type): ``_out_axis``, the axis of the output features in the
    base weight; ``_output_view``, the shape a per-output-feature vector takes to broadcast over
    the output (the DoRA magnitude's shape); ``_drops_input``, whether dropout applies to the input.

    Example::

        layer = wrap_module(model.q_proj)          # LoraLinear; model.q_proj is untouched
        layer.add_adapter("sql", r=8, alpha=16)
        y = layer(x)                               # base(x) + B(A(x)) * 2
        layer.merge(); layer.unmerge()             # weight back bit for bit
    """

    _out_axis = 0
    _output_view: tuple[int, ...] = (-1,)
    _drops_input = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.switches: dict[str, Switch] = {}
        self.disabled = False
        self.merged_adapters: list[str] = []
        # clone of base_layer.weight taken before the first merge; copied back by unmerge()
        self._original_weight: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_layer":
                raise
            base = self.__dict__.get("_modules", {}).get("base_layer")  # absent while unpickling
            if base is None:
                raise
            return getattr(base, name)

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter held by this layer, in the order they were added."""
        return tuple(self.r)

    @property
    def is_merged(self) -> bool:
        """Whether any adapter is currently folded into the base weight."""
        return bool(self.merged_adapters)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitLoraWeights = True,
        use_dora: bool = False,
        unmerged_weight: torch.Tensor | None = None,
    ) -> None:
        """Add a named adapter and make it active.

        Args:
            name: adapter name (a ``ModuleDict`` key: non-empty, no ``"."``, not ``"__base__"``).
            r: rank, a positive int.
            alpha: ``lora_alpha``, positive.
            dropout: probability in ``[0, 1)`` applied to the adapter input only.
            use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
            init_lora_weights: see :data:`InitLoraWeights`; values are drawn in PEFT's order,
                so the same seed gives PEFT's values on CPU.
            use_dora: a DoRA adapter: its magnitude starts as ``||W + scaling * B @ A||_c`` of the
                factors just initialised (PEFT's rule; see :mod:`prefix_hooks.lora.dora`).
            unmerged_weight: the base weight without merged updates, for that magnitude, when
                ``base_layer``'s weight holds another layer's merged adapters (default:
                :meth:`unmerged_weight`).

        Raises:
            ValueError / TypeError: a bad argument, an existing name, or DoRA on a layer that
                cannot have it (:meth:`_check_dora`); nothing is changed.
        """
        self._check_new_name(name)
        where = f" for adapter {name!r}"
        check_lora_numbers(r, alpha, dropout, where)
        check_init_lora_weights(init_lora_weights, where)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora={use_dora!r} is not accepted{where}; expected True or False")
        self._check_rank(name, r)
        if use_dora:
            self._check_dora(name)
        self._create_factors(name, r, init_lora_weights)
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        if use_dora:
            weight = self.unmerged_weight() if unmerged_weight is None else unmerged_weight
            with torch.no_grad():
                norm = self._column_norm(name, weight)  # (out,)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm.view(self._output_view))
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its parameters.

        Raises:
            KeyError: no adapter of that name.
            ValueError: the adapter is merged (call :meth:`unmerge` first).
        """
        self._check_known(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; call unmerge() before deleting it")
        self._delete_factors(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.lora_dropout[name]
        del self.r[name], self.lora_alpha[name], self.scaling[name]
        self.switches.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str] | tuple[str, ...]) -> None:
        """Make exactly ``names`` the active adapters (in that order; an empty list = none active).

        Merged adapters stay merged whatever the active set: call :meth:`unmerge` to take
        them out of the weight.

        Raises:
            TypeError: ``names`` is not a list/tuple of str.
            KeyError: an unknown name. ValueError: a repeated name.
        """
        if not isinstance(names, (list, tuple)):
            raise TypeError(f"set_active expects a list of adapter names, got {names!r}")
        for name in names:
            self._check_known(name)
        if len(set(names)) != len(names):
            raise ValueError(f"set_active got a repeated adapter name in {list(names)!r}")
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter (the DoRA magnitude last)."""
        self._check_known(name)
        factors = list(self.lora_A[name].parameters()) + list(self.lora_B[name].parameters())
        return factors + self._magnitude_parameters(name)

    def _magnitude_parameters(self, name: str) -> list[nn.Parameter]:
        """``[m]`` for a DoRA adapter, ``[]`` otherwise."""
        return list(self.lora_magnitude_vector[name].parameters()) if name in self.lora_magnitude_vector else []

    def is_dora(self, name: str) -> bool:
        """Whether adapter ``name`` is a DoRA adapter (holds a magnitude)."""
        self._check_known(name)
        return name in self.lora_magnitude_vector

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x, *args, **kwargs)`` plus the active, unmerged adapters' updates.

        An adapter whose handle's ``disabled()`` block is open in the calling thread (or async
        task) adds nothing there; forwards elsewhere keep it (see :attr:`switches`). Under
        :func:`prefix_hooks.core.rows.adapter_rows_context` row ``b`` (dim 0 of ``x``) gets only
        the adapter named ``rows[b]``, active, disabled or neither (``"__base__"`` or an adapter
        this layer does not hold: none).

        Raises:
            ValueError: per-row names whose length is not ``x.shape[0]``, or per-row names
                while an adapter is merged.
            RuntimeError: a merged adapter is switched off in this thread / task.
        """
        rows = current_adapter_rows()
        if self.disabled:
            if self.is_merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if rows is not None:
            return self._mixed_rows_forward(rows, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        names = [name for name in self.active_adapters if name not in self.merged_adapters]
        off = switched_off()
        if off:  # some handle's disabled() block is open in this thread / task
            names = self._switched_on(names, off)
        if not names:
            return result
        out_dtype = result.dtype
        for name in names:
            result = result + self._added_output(name, x, result)  # promotes to float32
        return as_dtype(result, out_dtype)

    def _switched_on(self, names: list[str], off: frozenset[int]) -> list[str]:
        """``names`` without the adapters whose switch is ``off`` (ids) in this thread / task.

        Raises:
            RuntimeError: a merged adapter is switched off here. Its delta is in the weight, so
                the forward cannot leave it out (a task created inside ``disabled()`` keeps
                the switch after the block, and the adapter was merged since).
        """
        switches = self.switches
        off_here = {name for name, switch in switches.items() if id(switch) in off}
        merged = [name for name in self.merged_adapters if name in off_here]
        if merged:
            raise RuntimeError(
                f"LoRA adapters {merged} are merged into the weight of this {type(self.base_layer).__name__} but "
                "disabled() in this thread / task (a task created inside the block keeps it switched off); "
                "unmerge() them, or run this forward outside the disabled() context"
            )
        return [name for name in names if name not in off_here]

    def _mixed_rows_forward(self, rows: tuple[str, ...], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(rows) != x.shape[0]:
            raise ValueError(
                f"adapter rows name {len(rows)} rows but {type(self.base_layer).__name__} received a batch of "
                f"{x.shape[0]} (input shape {tuple(x.shape)}); pass one adapter name per batch row"
            )
        if self.is_merged:
            raise ValueError(
                f"per-row adapter selection is not possible while adapters {self.merged_adapters} are merged; "
                "unmerge() first"
            )
        result = self.base_layer(x, *args, **kwargs)  # (B, ...)
        out_dtype = result.dtype
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(rows):
            if name in self.r:  # never true for "__base__", a reserved name
                groups.setdefault(name, []).append(row)
        if not groups:
            return result
        # accumulate in float32 so a row is rounded once, as when its adapter runs alone
        acc = result.to(torch.promote_types(out_dtype, ADAPTER_DTYPE))
        for name, indices in groups.items():
            picked = torch.tensor(indices, device=x.device)  # (B_name,)
            added = self._added_output(name, x.index_select(0, picked), result.index_select(0, picked))
            acc = acc.index_add(0, picked, added)
        return acc.to(out_dtype)

    # ------------------------------------------------------------------ per type
    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        raise NotImplementedError

    def _delete_factors(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B(A(dropout(x))) * scaling`` in float32, shaped like the base output (a plain LoRA adapter's term)."""
        if self._drops_input:
            x = self.lora_dropout[name](as_dtype(x, weight_of(self.lora_A[name]).dtype))
        return self._update(name, x)

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x)) * scaling`` in float32 (no dropout), shaped like the base output."""
        x = as_dtype(x, weight_of(self.lora_A[name]).dtype)
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias, for DoRA under dropout (types with ``_drops_input``)."""
        raise NotImplementedError

    def _delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _check_rank(self, name: str, r: int) -> None:
        """Type-specific constraints on the rank (Conv2d with groups)."""

    def _check_dora(self, name: str) -> None:
        """Raise ValueError if adapter ``name`` cannot be a DoRA adapter on this layer."""
        if self.base_weight().device.type == "meta":
            raise ValueError(
                f"use_dora=True for adapter {name!r} needs the values of the {type(self.base_layer).__name__}'s "
                "weight (DoRA takes its norm at every forward), but the weight is on the meta device (offloaded); "
                "load the model without offloading this module, or use plain LoRA"
            )

    # ------------------------------------------------------------------ DoRA
    def _added_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``result``, the output so far for input ``x`` (float32)."""
        if name not in self.lora_magnitude_vector:
            return self._adapter_output(name, x)
        dropout = self.lora_dropout[name]
        if self._drops_input and self.training and not isinstance(dropout, nn.Identity):
            x = dropout(as_dtype(x, weight_of(self.lora_A[name]).dtype))
            base = self._base_output(x)  # W drop(x), recomputed as PEFT does
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = result if bias is None else result - bias.view(self._output_view)  # W x (+ earlier adapters)
        return added_output(self._magnitude_scale(name), base, self._update(name, x))

    # ------------------------------------------------------------------ helpers
    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight: the very tensor the model had, not a copy."""
        return weight_of(self.base_layer)

    def _weight_device(self) -> torch.device:
        """Where the adapter factors live: the base weight's device, or, for a weight offloaded by
        accelerate (on ``meta``), the device its hook computes on."""
        return offload_aware_device(self.base_layer, self.base_weight())

    def _init_linear_factors(self, name: str, init_lora_weights: InitLoraWeights) -> None:
        # lora_A/lora_B were just built with their default (Kaiming-uniform) init, as PEFT builds them
        a_weight, b_weight = weight_of(self.lora_A[name]), weight_of(self.lora_B[name])
        if init_lora_weights is False:
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(a_weight, std=1 / a_weight.shape[0])
        else:
            nn.init.kaiming_uniform_(a_weight, a=math.sqrt(5))
        nn.init.zeros_(b_weight)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name == BASE_ROW:
            raise ValueError(f"adapter name {name!r} is reserved for the base model in per-row selection")
        if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
            raise ValueError(f"adapter name {name!r} clashes with a torch.nn container attribute; choose another")
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists on this layer (adapters: {list(self.r)})")

    def _check_known(self, name: str) -> None:
        if name not in self.r:
            raise KeyError(f"no adapter named {name!r} on this layer (adapters: {list(self.r)})")

    def extra_repr(self) -> str:
        return f"adapters={list(self.r)}, active={self.active_adapters}, merged={self.merged_adapters}"

