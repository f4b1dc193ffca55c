"""What an architecture adapter tells the library about one model family.

An adapter answers five questions about a model:

1. which modules are its attention layers, and which prefix slot (layer) each reads;
2. how many key/value heads and what head size each produces;
3. which module receives the inputs and passes ``**kwargs`` down to the attention function
   (the *root*, whose ``forward``, shadowed while attached, injects the per-forward prefix);
4. how the prefix reaches the attention computation: through the attention-function
   registry (the default, nothing to install) or through per-module hooks
   (:meth:`ArchitectureAdapter.install_site_hooks`, for families that compute attention inline);
5. which positions the model gives its tokens, so that real tokens can be shifted
   behind the prefix (:meth:`ArchitectureAdapter.offset_positions`).

The adapters themselves live in :mod:`prefix_hooks.families` (one module per family), which
registers each one here with :func:`register_family` when it is imported; the prefix method
finds the adapter serving a model with :func:`adapter_for`. The families depend on this
module, not the other way round.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import cached_length, find_cache
from prefix_hooks.prefix.prefixed_cache import PrefixedStorage

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack
    from prefix_hooks.prefix.config import PrefixTuningConfig


@dataclass(frozen=True)
class AttentionSite:
    """One attention module that receives a prefix.

    Attributes:
        module: the attention module (the one that calls the attention function).
        layer: its prefix slot, ``0..L-1`` (for decoders the model's ``layer_idx``). Several
            sites may read one slot (e.g. a decoder layer's self- and cross-attention when
            they share a prefix); the slots in use must be exactly ``0..L-1``.
        kv_heads: key/value heads the module produces.
        head_dim: size of one head.
        role: what the module attends over, for messages and family code:
            ``"self"``, ``"encoder"``, ``"decoder"`` or ``"cross"``.
    """

    module: nn.Module
    layer: int
    kv_heads: int
    head_dim: int
    role: str = "self"


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a model's prefix, as read from its attention layers."""

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    num_transformer_submodules: int = 1


@dataclass(frozen=True)
class PositionInputs:
    """What the root model was called with, as far as positions are concerned.

    Attributes:
        seq_len: number of new tokens ``T`` in this call.
        past_len: tokens already in the cache.
        attention_mask: the 2-D ``(B, past_len + T)`` mask (``1 = real token``) or ``None``.
        device: where the positions must live.
        input_ids: the new tokens ``(B, T)``, or ``None`` when the call passed embeddings.
    """

    seq_len: int
    past_len: int
    attention_mask: torch.Tensor | None
    device: torch.device
    input_ids: torch.Tensor | None = None


class SpliceSource(Protocol):
    """Per-forward state: the prefix for each attention module of one attached model.

    Attributes:
        mask_cache: per-forward memo of extended masks, keyed by the original mask.
        position_offset: the offset the running root gave its real tokens' positions (per-module
            hooks of families that look positions up inside the model read it).
        storage: the attachment's cache layers that hold its prefix in front (decode steps).
    """

    mask_cache: dict[Any, tuple[Any, Any]]
    position_offset: int
    storage: PrefixedStorage

    def prefix_for(
        self, module: nn.Module, batch: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values ``(kv_heads, P, D)`` for ``module`` (counted as spliced), or ``None``;
        with ``batch`` and ``dtype``, ``(batch, kv_heads, P, D)`` expanded views in ``dtype``."""

    def carried_prefix(self, key: torch.Tensor) -> tuple[int, int] | None:
        """``(slot, P)`` when the cache returned ``key`` with that slot's ``P`` prefix positions in front, else ``None``."""

    def count_spliced(self) -> None:
        """Count one attention layer as having taken its prefix (without :meth:`prefix_for`)."""

    def stored_prefix(self, module: nn.Module, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``module``'s prefix ``(batch, kv_heads, P, D)`` for a :class:`PrefixedStorage` (the same views from
        forward to forward), or ``None`` when it records a gradient. Not counted as spliced."""

    def slot_of(self, module: nn.Module) -> int | None:
        """``module``'s prefix slot, or ``None`` for a module without a prefix."""


CurrentState = Callable[[], "SpliceSource | None"]
"""Returns the prefix state of the forward running on this thread (or of the last one, for a
gradient-checkpointing recomputation during backward), ``None`` when disabled or before any forward."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """How prefix tuning finds its way into one family of transformers models.

    Register an instance with :func:`prefix_hooks.families.register_family` to support
    another architecture whose attention modules call
    ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` and pass ``**kwargs`` down to it.

    Attributes:
        name: the family's name (used in messages).
        model_types: ``config.model_type`` values this adapter serves.
        attention_classes: class names of the attention modules that get a prefix.
        head_dim_attr: attribute of the attention module holding the head size.
        layer_attr: attribute of the attention module holding its layer index (its prefix slot).
    """

    name: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]
    head_dim_attr: str = "head_dim"
    layer_attr: str = "layer_idx"
    num_transformer_submodules: int = field(default=1)

    def base_model(self, model: nn.Module) -> nn.Module:
        """The module that takes ``input_ids``/``position_ids`` and runs the layers."""
        return getattr(model, "base_model", model)

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` that ``module`` produces."""
        head_dim = int(getattr(module, self.head_dim_attr))
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # type: ignore[attr-defined]
        return int(kv_heads), head_dim

    def attention_sites(self, model: nn.Module, config: PrefixTuningConfig | None = None) -> list[AttentionSite]:
        """Every attention module of ``model`` that gets a prefix, ordered by slot.

        ``config`` is the user's (unresolved) prefix config, for families whose layout
        depends on it (encoder-decoders read ``num_transformer_submodules``); ``None``
        asks for the default layout.
        """
        model_config = text_config(model)
        sites = []
        for module in model.modules():
            if type(module).__name__ in self.attention_classes:
                layer = getattr(module, self.layer_attr, None)
                if layer is None:
                    raise ValueError(f"{type(module).__name__} has no {self.layer_attr}; cannot place its prefix")
                kv_heads, head_dim = self.kv_shape(module, model_config)
                sites.append(AttentionSite(module, int(layer), kv_heads, head_dim))
        sites.sort(key=lambda site: site.layer)
        return sites

    def unsupported_reason(self, model: nn.Module) -> str | None:
        """Why this particular model cannot take a prefix, or ``None`` when it can."""
        return None

    def roots(self, model: nn.Module, sites: Sequence[AttentionSite]) -> list[nn.Module]:
        """The modules whose forward runs the ``sites``; each site is reached from exactly one.

        Each root's shadowed ``forward`` builds the per-forward prefix state (and shifts that root's
        positions). The default is :meth:`base_model`; encoder-decoders return each stack,
        because ``generate()`` runs the encoder on its own.
        """
        return [self.base_model(model)]

    def num_slots(self, model: nn.Module, config: PrefixTuningConfig, sites: Sequence[AttentionSite]) -> int:
        """Slots in the prefix tensor (its ``num_layers``); the sites read a subset of ``0..num_slots-1``.

        The default is one slot per distinct site slot. Layouts that keep slots no module reads
        (PEFT's encoder-decoder layout) override it.
        """
        return len({site.layer for site in sites})

    def interposer_serves(self, site: AttentionSite) -> bool:
        """Whether the attention interposer alone splices ``site``'s prefix: no hook of the family's own
        puts it in front of the cached keys (a cache view does, for inline attention). Only such
        decoder self-attention sites may keep the prefix in the cache's storage (``prefixed_cache``)."""
        return True

    def install_site_hooks(self, sites: list[AttentionSite], current_state: CurrentState, undo: UndoStack) -> None:
        """Install what delivers each site's prefix, pushing every removal onto ``undo``.

        The default installs nothing: the attention-function interposer reads the state
        from the call's ``**kwargs``. Families that compute attention inline register
        per-module hooks here that call ``current_state().prefix_for(site.module)``.
        """

    def default_position_offset(self, root: nn.Module, num_virtual_tokens: int) -> int:
        """The offset ``position_offset=None`` means: ``P`` (PEFT's and the paper's convention,
        real tokens after the prefix) for models that take positions; families without
        position inputs (vision, relative-only) override it with 0."""
        return num_virtual_tokens

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        """Why ``root`` cannot shift its positions by ``offset``, or ``None`` when it can."""
        params = inspect.signature(root.forward).parameters
        if offset and "position_ids" not in params:
            return (
                f"position_offset={offset} needs position_ids, which {type(root).__name__}.forward does not take; "
                "set position_offset=0"
            )
        return None

    def offset_positions(self, call: ForwardCall, offset: int) -> None:
        """Shift the real tokens' positions by ``offset`` in the root call (``offset > 0``).

        The default adds ``offset`` to given ``position_ids``, or passes the positions
        :meth:`position_ids` computes for the call's tokens and cache.
        """
        positions = call.get("position_ids")
        if positions is not None:
            call.set("position_ids", positions + offset)
            return
        input_ids = call.get("input_ids")
        tokens = input_ids if input_ids is not None else call.get("inputs_embeds")
        if tokens is None:
            return
        _, cache = find_cache(call)
        past_len = cached_length(cache)
        mask = call.get("attention_mask")
        inputs = PositionInputs(
            seq_len=tokens.shape[1],
            past_len=int(past_len),
            attention_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            device=tokens.device,
            input_ids=input_ids,
        )
        call.set("position_ids", self.position_ids(inputs, offset))

    def position_ids(self, inputs: PositionInputs, offset: int) -> torch.Tensor:
        """Positions the model would give the new tokens if ``offset`` tokens came first.

        The default is the arange most decoders use: ``(1, T)`` from ``past_len + offset``.
        """
        start = inputs.past_len + offset
        return torch.arange(start, start + inputs.seq_len, device=inputs.device).unsqueeze(0)  # (1, T)


def text_config(model: nn.Module) -> Any:
    """The model's text config (``config.get_text_config()`` where it exists, else ``config``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a transformers PreTrainedModel")
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


_ADAPTERS: dict[str, ArchitectureAdapter] = {}


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


def register_family(adapter: ArchitectureAdapter, *, replace: bool = False) -> None:
    """Make ``adapter`` serve each of its ``model_types``.

    Raises:
        ValueError: a model type already has an adapter and ``replace`` is False.
    """
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS and not replace:
            raise ValueError(
                f"model_type {model_type!r} already has the adapter {_ADAPTERS[model_type].name!r}; "
                "pass replace=True to override it"
            )
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


def supported() -> list[str]:
    """Model types (``config.model_type``) that prefix tuning supports, sorted."""
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter serving ``model``.

    Raises:
        UnsupportedModelError: no adapter serves the model's ``config.model_type``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model_type={model_type!r} ({type(model).__name__}) is not supported; supported families: "
            f"{', '.join(supported())}. Register your own with "
            "prefix_hooks.families.register_family(ArchitectureAdapter(...))"
        )
    return _ADAPTERS[model_type]
