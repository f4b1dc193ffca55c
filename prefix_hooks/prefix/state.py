"""The per-forward state of an attached prefix: what every attention layer of one forward reads.

The root's shadowed ``forward`` builds a :class:`PrefixForwardState` and passes it down through
``**kwargs`` (see :mod:`prefix_hooks.prefix.interposer`); it implements
:class:`~prefix_hooks.prefix.architecture.SpliceSource`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prefix_hooks.prefix.prefixed_cache import PrefixedStorage
from prefix_hooks.prefix.views import LayerViews, expanded


class SpliceCount:
    """How many attention layers took the prefix during one forward.

    Not a dataclass, so the copies of the state that FSDP2 makes (``dataclasses.replace``, to
    wrap the prefix tensor once per sharded layer) all count into the one object."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@dataclass
class PrefixForwardState:
    """The prefix of one forward call, for every attention module of the model.

    Attributes:
        layer_of: attention module -> layer index.
        kv: ``(L, 2, kv_heads, P, D)``; ``kv[i, 0]`` are layer ``i``'s keys, ``kv[i, 1]`` its values.
        mask_cache: extended masks, shared by the layers that receive the same mask.
        views: memo of the batch-expanded per-layer views (the attachment's, reused across forwards).
        position_offset: the offset this forward's root gave the real tokens' positions; per-module
            hooks of families that look positions up inside the model read it.
    """

    layer_of: dict[nn.Module, int]
    kv: torch.Tensor
    rebuild: Callable[[], torch.Tensor]
    mask_cache: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    position_offset: int = 0
    splice_count: SpliceCount = field(default_factory=SpliceCount)  # shared by copies of this state
    views: LayerViews = field(default_factory=LayerViews)
    storage: PrefixedStorage = field(default_factory=PrefixedStorage)
    cache_slots: dict[int, int] = field(default_factory=dict)
    """Cache layer index -> prefix slot, for the layers whose cache :class:`PrefixedCache` may step over."""
    prefixed: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    """``id(full key)`` -> (that key, its slot): keys the cache returned with the slot's prefix in front
    (emptied when the forward returns)."""
    _no_grad_calls: bool = False
    _parts: tuple[torch.Tensor, ...] | None = None  # kv split into 2L (kv_heads, P, D) tensors, once per forward

    @property
    def spliced(self) -> int:
        """Attention layers that took the prefix so far in this forward (across copies of the state)."""
        return self.splice_count.value

    def prefix_for(
        self, module: nn.Module, batch: int | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values for ``module``: ``(kv_heads, P, D)`` each, or with ``batch`` and
        ``dtype`` given, ``(batch, kv_heads, P, D)`` expanded views in ``dtype``; ``None`` for a
        module without a prefix. Counts the call as a spliced layer."""
        layer = self.layer_of.get(module)
        if layer is None:
            return None
        self.splice_count.value += 1
        kv = self.kv
        parts = self._parts
        if kv.requires_grad and not torch.is_grad_enabled():
            self._no_grad_calls = True  # reentrant checkpointing's first pass records no graph here
        elif self._no_grad_calls and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            # Reentrant recomputation runs one backward per layer: give each layer its own
            # encoder graph, or the second layer would backpropagate through freed buffers.
            kv, parts = self.rebuild(), None
        recording = kv.requires_grad and torch.is_grad_enabled()
        if batch is not None and dtype is not None and not recording:
            return self.views.get(kv, layer, batch, dtype)  # (B, kv_heads, P, D) each, memoized across forwards
        if parts is None:
            # one split for all layers: its backward is one stack, where a select per layer would
            # each allocate and fill a gradient of the whole (L, 2, kv_heads, P, D) tensor
            parts = kv.flatten(0, 1).unbind(0)  # 2L x (kv_heads, P, D); keys of layer i at 2i, values at 2i + 1
            if kv is self.kv:
                self._parts = parts
        keys, values = parts[2 * layer], parts[2 * layer + 1]  # (kv_heads, P, D) each
        if batch is not None and dtype is not None:
            return expanded(keys, batch, dtype), expanded(values, batch, dtype)  # (B, kv_heads, P, D) each
        return keys, values


    def cache_prefix(self, layer_idx: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefix ``(batch, kv_heads, P, D)`` to keep in front of cache layer ``layer_idx``, or ``None``
        (no slot for that layer, or a prefix that records a gradient this forward). Not counted as spliced."""
        slot = self.cache_slots.get(layer_idx)
        if slot is None or (self.kv.requires_grad and torch.is_grad_enabled()):
            return None
        return self.views.get(self.kv, slot, batch, dtype)

    def note_prefixed(self, full_key: torch.Tensor, layer_idx: int) -> None:
        """Remember that the cache returned ``full_key`` with cache layer ``layer_idx``'s prefix in front."""
        self.prefixed[id(full_key)] = (full_key, self.cache_slots[layer_idx])

    def carried_prefix(self, key: torch.Tensor) -> tuple[int, int] | None:
        """``(slot, P)`` when ``key`` came from :meth:`note_prefixed`, else ``None``."""
        entry = self.prefixed.get(id(key))
        return (entry[1], self.kv.shape[3]) if entry is not None and entry[0] is key else None

    def count_spliced(self) -> None:
        """Count one attention layer as having taken its prefix (without :meth:`prefix_for`)."""
        self.splice_count.value += 1

    def stored_prefix(self, module: nn.Module, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``module``'s prefix ``(batch, kv_heads, P, D)`` for :attr:`storage` (memoized views), or ``None``
        when it records a gradient this forward. Not counted as spliced."""
        layer = self.layer_of.get(module)
        if layer is None or (self.kv.requires_grad and torch.is_grad_enabled()):
            return None
        return self.views.get(self.kv, layer, batch, dtype)

    def slot_of(self, module: nn.Module) -> int | None:
        """``module``'s prefix slot, or ``None`` for a module without a prefix."""
        return self.layer_of.get(module)
