"""Decode at base cost: cached keys and values whose storage already holds the prefix in front.

transformers' ``DynamicLayer.update`` appends each step's keys and values by concatenation,
copying the layer's whole cache once per step. Attention over ``[prefix; cached]`` then needs
either a second copy (concatenating the prefix in front) or a second attention call over the
prefix merged by log-sum-exps (:mod:`prefix_hooks.prefix.merged_attention`, about twenty extra
operators per layer). Instead, for a step that continues a layer already holding tokens,
:class:`PrefixedStorage` appends to a buffer that begins with the prefix and hands out views::

    buffer = [prefix; cached; new]               first continuing step   (B, kv_heads, C >= P + S + T, D)
    buffer = cat([buffer, new])                  short cache: the copy DynamicLayer makes anyway
    buffer[:, :, P + S : P + S + T] = new        long cache (>= INPLACE_FROM): into spare room, no copy
    attention gets buffer[:, :, : P + S + T]     a view
    layer.keys = buffer[:, :, P : P + S + T]     a view: the layer holds exactly its real tokens

A long cache's buffer has room for ``max(n / 16, 32)`` more positions when it grows, so the
whole layer is copied once every ``S / 16`` steps instead of on every step, as
``DynamicLayer.update`` does: a long decode step costs less than the base model's. Every
length, position, mask, ``crop`` and reorder the cache reports or performs is prefix-free
(a crop or reorder replaces the layer's tensors, and the next step starts a new buffer),
tensors taken from the layer earlier keep their values (only positions past them are
written), and after detach the next ``DynamicLayer.update`` concatenates onto the view as
always. Operators per layer over the base: +2 views (short), +6 views and slot copies
without the 2 concatenations (long).

It takes a step over only where that is exactly what ``Cache.update`` would do: the
cache's ``update`` is ``Cache.update`` (no subclass override, no offloading), the layer is a
``DynamicLayer`` (no sliding window, quantization or static buffer), already initialised and
non-empty, and the new states match its dtype, device and batch. A prefill, a foreign layer,
or a prefix that records a gradient goes through the cache's own ``update``. Writing in place
also needs new states that record no gradient and a buffer that is not an inference tensor
outside inference mode; otherwise the step copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import wrapt
from transformers.cache_utils import Cache, DynamicLayer

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import find_cache

PrefixOf = Callable[[int, int, torch.dtype], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``(layer_idx, batch, dtype)`` -> the cache layer's prefix keys and values ``(B, kv_heads, P, D)``, or ``None``."""
OnPrefixed = Callable[[torch.Tensor, int], None]
"""``(full_key, layer_idx)``: a key tensor returned with the prefix in front."""


def steps_over(cache: object) -> bool:
    """Whether a :class:`PrefixedStorage` may stand in for ``cache.update`` at all (per layer it checks more)."""
    return (
        isinstance(cache, Cache)
        and type(cache).update is Cache.update
        and not getattr(cache, "offloading", True)
        and isinstance(getattr(cache, "layers", None), list)
    )


INPLACE_FROM = 128
"""A layer whose prefix and tokens reach this many positions is stored with spare room and appended
in place; below it each step concatenates (a short cache copies less than the views cost)."""
SPARE_FRACTION = 16
MIN_SPARE = 32
"""Room left behind the tokens when a layer's storage grows: ``max(needed // 16, 32)`` positions,
so a copy of the whole layer happens once every ``S / 16`` steps and costs at most 1/16 more memory."""


class _Record:
    """What a :class:`PrefixedStorage` keeps of one cache layer (updated in place every step).

    ``key_buffer`` and ``value_buffer`` are ``(B, kv_heads, C, D)`` with the prefix in the first
    ``P`` positions and the layer's tokens after it, ``used <= C`` positions written; the
    layer holds ``real_key``/``real_value``, views of positions ``P .. used``.
    """

    __slots__ = ("key_buffer", "value_buffer", "used", "prefix_key", "prefix_value", "real_key", "real_value")

    def __init__(self, buffers: tuple[torch.Tensor, torch.Tensor], used: int, real: tuple[torch.Tensor, torch.Tensor],
                 prefix: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.set(buffers, used, real, prefix)

    def set(self, buffers: tuple[torch.Tensor, torch.Tensor], used: int, real: tuple[torch.Tensor, torch.Tensor],
            prefix: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Remember this step's tensors."""
        self.key_buffer, self.value_buffer = buffers  # (B, kv_heads, C, D) each, contiguous
        self.used = used  # P + S: positions written
        self.real_key, self.real_value = real  # (B, kv_heads, S, D): what the layer holds
        self.prefix_key, self.prefix_value = prefix  # the (B, kv_heads, P, D) prefix the buffers begin with

    def holds(self, layer: DynamicLayer, key_states: torch.Tensor, value_states: torch.Tensor, prefix_key: torch.Tensor,
              prefix_value: torch.Tensor) -> bool:
        """Whether ``layer`` still holds what was left there, the prefix is the same, and the new
        ``(B, kv_heads, T, D)`` entries continue it (dtype, device, batch and heads)."""
        buffer = self.key_buffer
        return (
            self.real_key is layer.keys
            and self.real_value is layer.values
            and self.prefix_key is prefix_key
            and self.prefix_value is prefix_value
            and key_states.dtype == value_states.dtype == buffer.dtype
            and key_states.device == buffer.device
            and key_states.shape[:2] == value_states.shape[:2] == buffer.shape[:2]
        )

    def fits(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the new ``(B, kv_heads, T, D)`` entries (which :meth:`holds` continue) may be written
        into the spare room in place: room enough, no gradient to record, no inference tensor outside
        inference mode (where the copy ``DynamicLayer.update`` makes is allowed but writing is not)."""
        buffer = self.key_buffer
        return (
            self.used + key_states.shape[-2] <= buffer.shape[-2]
            and not buffer.requires_grad
            and not (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad))
            and (torch.is_inference_mode_enabled() or not buffer.is_inference())
        )


class PrefixedStorage:
    """One attachment's cache layers whose storage holds its prefix in front, weakly keyed by layer."""

    def __init__(self) -> None:
        self._records: weakref.WeakKeyDictionary[DynamicLayer, _Record] = weakref.WeakKeyDictionary()

    def update(
        self,
        cache: Any,
        layer_idx: int,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        prefix_key: torch.Tensor,
        prefix_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Append to ``cache.layers[layer_idx]`` as ``DynamicLayer.update`` does, with the prefix in front.

        Args:
            cache: a cache for which :func:`steps_over` holds.
            layer_idx: the layer ``Cache.update`` was asked for.
            key_states, value_states: ``(B, kv_heads, T, D)`` new entries.
            prefix_key, prefix_value: ``(B, kv_heads, P, D)`` in the cache's dtype (an expanded
                view is fine); the same objects from step to step while the prefix is unchanged.

        Returns:
            ``(B, kv_heads, P + S + T, D)`` keys and values beginning with the prefix, the layer
            left holding views of their last ``S + T`` positions; or ``None`` where this must not
            stand in for the cache (the caller runs ``cache.update``).
        """
        layers = cache.layers
        if layer_idx >= len(layers):
            return None
        layer = layers[layer_idx]
        record = self._records.get(layer)
        if record is not None and record.holds(layer, key_states, value_states, prefix_key, prefix_value):
            used = record.used
            if record.fits(key_states, value_states):  # steady state of a long cache: O(T) writes, no copy
                _window(record.key_buffer, used, key_states.shape[-2]).copy_(key_states)
                _window(record.value_buffer, used, value_states.shape[-2]).copy_(value_states)
                buffers = record.key_buffer, record.value_buffer
            else:  # the one copy DynamicLayer.update makes, with room behind it once the cache is long
                buffers = (_joined([_leading(record.key_buffer, used), key_states]),
                           _joined([_leading(record.value_buffer, used), value_states]))
            needed = used + key_states.shape[-2]
        elif _may_step(layer, key_states, value_states, prefix_key, prefix_value):
            # first continuing step, or the layer was cropped, reordered or written by someone else
            buffers = (_joined([prefix_key, layer.keys, key_states]),  # (B, kv_heads, C >= P + S + T, D)
                       _joined([prefix_value, layer.values, value_states]))
            needed = prefix_key.shape[-2] + layer.keys.shape[-2] + key_states.shape[-2]
        else:
            return None
        full = _leading(buffers[0], needed), _leading(buffers[1], needed)  # (B, kv_heads, P + S + T, D)
        num_prefix = prefix_key.shape[-2]
        real = (_window(buffers[0], num_prefix, needed - num_prefix),  # (B, kv_heads, S + T, D)
                _window(buffers[1], num_prefix, needed - num_prefix))
        layer.keys, layer.values = real
        if record is None:
            self._records[layer] = _Record(buffers, needed, real, (prefix_key, prefix_value))
        else:
            record.set(buffers, needed, real, (prefix_key, prefix_value))
        return full

    def clear(self) -> None:
        """Forget every layer (the layers keep their views, which stay valid prefix-free tensors)."""
        self._records = weakref.WeakKeyDictionary()


def _may_step(
    layer: object, key_states: torch.Tensor, value_states: torch.Tensor, prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
) -> bool:
    """Whether appending to ``layer`` through :class:`PrefixedStorage` is exactly ``DynamicLayer.update``."""
    if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False):
        return False  # sliding window, quantized, static, offloaded... or no tokens yet
    if torch.is_grad_enabled() and (prefix_key.requires_grad or prefix_value.requires_grad):
        return False  # a prefix that records a gradient must not leave its graph in the cache
    keys, values = layer.keys, layer.values  # (B, kv_heads, S, D) each
    return (
        keys is not None
        and values is not None
        and keys.dim() == 4
        and keys.shape[-2] > 0  # not a prefill: the merged attention serves that without any copy
        and keys.dtype == key_states.dtype == prefix_key.dtype
        and values.dtype == value_states.dtype == prefix_value.dtype
        and keys.device == key_states.device
        and keys.shape[0] == key_states.shape[0] == prefix_key.shape[0]
    )


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """``pieces`` ``(B, kv_heads, n_i, D)`` one after the other in a fresh ``(B, kv_heads, C, D)``
    tensor: exactly their length below :data:`INPLACE_FROM` positions (one ``cat``), with spare
    room behind from there on."""
    needed = sum(piece.shape[-2] for piece in pieces)
    if needed < INPLACE_FROM:
        return torch.cat(pieces, dim=-2)  # (B, kv_heads, needed, D)
    batch, heads, _, dim = pieces[-1].shape
    joined = pieces[-1].new_empty((batch, heads, needed + max(needed // SPARE_FRACTION, MIN_SPARE), dim))
    start = 0
    for piece in pieces:
        _window(joined, start, piece.shape[-2]).copy_(piece)  # an expanded prefix broadcasts over the batch
        start += piece.shape[-2]
    return joined


def _leading(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """``buffer``'s first ``length`` positions: ``buffer`` itself when that is all of it, else a view."""
    return buffer if buffer.shape[-2] == length else _window(buffer, 0, length)


def _window(buffer: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``buffer[:, :, start : start + length]`` as one ``as_strided`` (a slice dispatches two operators)."""
    batch, heads, _, dim = buffer.shape
    stride = buffer.stride()
    return buffer.as_strided((batch, heads, length, dim), stride, buffer.storage_offset() + start * stride[2])


class PrefixedCache(wrapt.ObjectProxy):
    """The cache one forward passes down, stepping through a :class:`PrefixedStorage` where it may.

    Everything but ``update`` is the wrapped cache's. ``update`` asks
    ``prefix_of(layer_idx, batch, dtype)`` for the layer's ``(B, kv_heads, P, D)`` prefix
    (``None``: no prefix for that layer); ``on_prefixed(full_key, layer_idx)`` is told of every
    key tensor returned with the prefix in front. After :meth:`close` (the forward returned)
    the proxy only passes calls through.
    """

    def __init__(self, cache: Any, storage: PrefixedStorage, prefix_of: PrefixOf, on_prefixed: OnPrefixed) -> None:
        super().__init__(cache)
        self._self_storage = storage
        self._self_prefix_of = prefix_of
        self._self_on_prefixed = on_prefixed
        self._self_open = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, kv_heads, T, D)`` new entries in; the layer's keys and values out, with the prefix in front
        where the storage stepped (see :meth:`PrefixedStorage.update`)."""
        if self._self_open:
            prefix = self._self_prefix_of(layer_idx, key_states.shape[0], key_states.dtype)
            if prefix is not None:
                stepped = self._self_storage.update(self.__wrapped__, layer_idx, key_states, value_states, *prefix)
                if stepped is not None:
                    self._self_on_prefixed(stepped[0], layer_idx)
                    return stepped
        return self.__wrapped__.update(key_states, value_states, layer_idx, *args, **kwargs)

    def close(self) -> None:
        """Pass every later call straight through (a proxy that escaped its forward must not splice)."""
        self._self_open = False


def wrap_cache(
    call: ForwardCall, storage: PrefixedStorage, prefix_of: PrefixOf, on_prefixed: OnPrefixed
) -> PrefixedCache | None:
    """Pass ``call``'s cache down as a :class:`PrefixedCache` (the call is changed in place).

    Returns:
        the proxy, to :meth:`~PrefixedCache.close` and :func:`unwrap_output_cache` after the
        forward; ``None`` when the call carries no cache that :func:`steps_over` accepts.
    """
    keyword, cache = find_cache(call)
    if keyword is None or not steps_over(cache):
        return None
    proxy = PrefixedCache(cache, storage, prefix_of, on_prefixed)
    call.set(keyword, proxy)
    return proxy


def unwrap_output_cache(output: Any, proxy: PrefixedCache) -> Any:
    """``output`` with the cache it returns (a model output's field or a tuple item) being the user's own, not ``proxy``."""
    if isinstance(output, MutableMapping):
        for key in [key for key, value in output.items() if value is proxy]:
            output[key] = proxy.__wrapped__
    elif isinstance(output, tuple) and any(item is proxy for item in output):
        items = [proxy.__wrapped__ if item is proxy else item for item in output]
        output = type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    return output
