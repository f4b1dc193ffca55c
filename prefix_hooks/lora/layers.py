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

Merging adds the delta weights into ``base_layer.weight`` in place after saving a clone of the
original; unmerging copies that clone back, so the original weight returns bit for bit (no
subtraction, which is not exact in low precision).
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.devices import offload_aware_device
from prefix_hooks.core.rows import BASE_ROW, current_adapter_rows
from prefix_hooks.core.switch import Switch, switched_off

InitLoraWeights = bool | Literal["gaussian"]
"""``True``: A Kaiming-uniform, B zero; ``"gaussian"``: A normal(std=1/r), B zero; ``False``: both random.

Embedding adapters follow PEFT: ``True``/``"gaussian"`` give A zero and B standard normal.
"""

ADAPTER_DTYPE = torch.float32
"""Dtype of every adapter parameter."""


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is {type(weight).__name__}, not a tensor")
    return weight


class LoraLayer(nn.Module):
    """Base of the LoRA wrappers; see the module docstring for the maths.

    Attributes:
        base_layer: the wrapped original module (same object, shared tensors).
        lora_A, lora_B: ``nn.ModuleDict`` adapter name -> factor module (empty for Embedding).
        lora_dropout: adapter name -> ``nn.Dropout`` (``nn.Identity`` for dropout 0).
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

    Example::

        layer = wrap_module(model.q_proj)          # LoraLinear; model.q_proj is untouched
        layer.add_adapter("sql", r=8, alpha=16)
        y = layer(x)                               # base(x) + B(A(x)) * 2
        layer.merge(); layer.unmerge()             # weight back bit for bit
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
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

        Raises:
            ValueError / TypeError: a bad argument or an existing name; nothing is changed.
        """
        self._check_new_name(name)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got r={r!r} for adapter {name!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got alpha={alpha!r} for adapter {name!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r} for adapter {name!r}")
        if init_lora_weights not in (True, False, "gaussian") or not isinstance(init_lora_weights, (bool, str)):
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r} for adapter {name!r}"
            )
        self._check_rank(name, r)
        self._create_factors(name, r, init_lora_weights)
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
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
        """The trainable tensors of one adapter."""
        self._check_known(name)
        return list(self.lora_A[name].parameters()) + list(self.lora_B[name].parameters())

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
            result = result + self._adapter_output(name, x)  # promotes to float32
        return result.to(out_dtype)

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
            acc = acc.index_add(0, picked, self._adapter_output(name, x.index_select(0, picked)))
        return acc.to(out_dtype)

    # ------------------------------------------------------------------ merging
    def merge(self, names: list[str] | tuple[str, ...] | None = None) -> None:
        """Fold adapters into ``base_layer.weight`` in place (module objects and state-dict keys stay).

        Args:
            names: adapters to merge; None = the active ones. Already merged ones are skipped.

        Raises:
            KeyError: an unknown name. ValueError: the layer cannot be merged (Conv2d with groups > 1).
        """
        todo = list(self.active_adapters if names is None else names)
        for name in todo:
            self._check_known(name)
        todo = [name for name in dict.fromkeys(todo) if name not in self.merged_adapters]
        if not todo:
            return
        self._check_mergeable()
        weight = self.base_weight()
        with torch.no_grad():
            if self._original_weight is None:
                self._original_weight = weight.detach().clone()
            for name in todo:
                weight.add_(self.delta_weight(name).to(weight.device))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore ``base_layer.weight`` bit-exactly by copying the saved original back (no-op if unmerged)."""
        if self._original_weight is None:
            return
        with torch.no_grad():
            self.base_weight().copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout and shape, float32 (keeps the autograd graph)."""
        self._check_known(name)
        return self._delta_weight(name)

    # ------------------------------------------------------------------ per type
    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        raise NotImplementedError

    def _delete_factors(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B(A(dropout(x))) * scaling`` in float32, shaped like the base output."""
        x = x.to(_weight(self.lora_A[name]).dtype)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    def _delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _check_rank(self, name: str, r: int) -> None:
        """Type-specific constraints on the rank (Conv2d with groups)."""

    def _check_mergeable(self) -> None:
        """Raise ValueError if the base weight cannot absorb a delta."""

    # ------------------------------------------------------------------ helpers
    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight: the very tensor the model had, not a copy."""
        return _weight(self.base_layer)

    def _weight_device(self) -> torch.device:
        """Where the adapter factors live: the base weight's device, or, for a weight offloaded by
        accelerate (on ``meta``), the device its hook computes on."""
        return offload_aware_device(self.base_layer, self.base_weight())

    def _init_linear_factors(self, name: str, init_lora_weights: InitLoraWeights) -> None:
        # lora_A/lora_B were just built with their default (Kaiming-uniform) init, as PEFT builds them
        a_weight, b_weight = _weight(self.lora_A[name]), _weight(self.lora_B[name])
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


class _LinearFactorsLayer(LoraLayer):
    """Shared part of the Linear-like layers: ``A = Linear(in, r)``, ``B = Linear(r, out)``, no biases."""

    in_features: int
    out_features: int

    def _create_factors(self, name: str, r: int, init_lora_weights: InitLoraWeights) -> None:
        device = self._weight_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self._init_linear_factors(name, init_lora_weights)

    def _delta_weight(self, name: str) -> torch.Tensor:
        delta = _weight(self.lora_B[name]) @ _weight(self.lora_A[name])  # (out, in)
        return delta * self.scaling[name]


class LoraLinear(_LinearFactorsLayer):
    """LoRA over ``nn.Linear`` (weight ``(out, in)``): ``A = Linear(in, r)``, ``B = Linear(r, out)``, no biases."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features


class LoraConv1D(_LinearFactorsLayer):
    """LoRA over transformers' ``Conv1D`` (GPT-2), whose weight is ``(in, out)``.

    The factors are PEFT's Linear ones; only :meth:`delta_weight` is transposed to the
    ``(in, out)`` layout (PEFT's ``fan_in_fan_out=True``, here implied by the type).
    """

    def __init__(self, base_layer: Conv1D) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    def _delta_weight(self, name: str) -> torch.Tensor:
        return super()._delta_weight(name).T  # (in, out)


class LoraEmbedding(LoraLayer):
    """LoRA over ``nn.Embedding``: ``lora_embedding_A`` ``(r, V)``, ``lora_embedding_B`` ``(D, r)``.

    The update for token ids ``x`` is ``embedding(x, A.T) @ B.T * scaling`` with the base
    layer's ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and ``sparse``
    (as PEFT; ``max_norm`` renormalises the looked-up columns of A in place, as F.embedding
    does). The base layer's scalar ``embed_scale`` (e.g. Gemma) multiplies the update too.
    Dropout is not applied to token ids (PEFT's behaviour).
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
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
        return [self.lora_embedding_A[name], self.lora_embedding_B[name]]

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
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
    by ``groups`` and the layer cannot be merged (as PEFT).
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def _check_rank(self, name: str, r: int) -> None:
        groups = cast(nn.Conv2d, self.base_layer).groups
        if r % groups != 0:
            raise ValueError(f"r={r} for adapter {name!r} must be divisible by the Conv2d's groups={groups}")

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
        a_weight = _weight(self.lora_A[name])  # (r, in, kh, kw)
        b_weight = _weight(self.lora_B[name])  # (out, r, 1, 1)
        delta = b_weight.flatten(1) @ a_weight.flatten(1)  # (out, in * kh * kw)
        return delta.view(self.out_features, *a_weight.shape[1:]) * self.scaling[name]  # (out, in, kh, kw)


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
