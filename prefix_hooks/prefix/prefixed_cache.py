"""Decode at base cost: cached keys and values whose storage already holds the prefix in front.

transformers' ``DynamicLayer.update`` appends each step's keys and values by concatenation,
copying the layer's whole cache once per step. Attention over ``[prefix; cached]`` then needs
either a second copy (concatenating the prefix in front) or a second attention call over the
prefix merged by log-sum-exps (:mod:`prefix_hooks.prefix.merged_attention`, about twenty extra
operators per layer). Instead, for a step that continues a layer already holding tokens,
:class:`PrefixedStorage` performs the layer's one concatenation itself, onto a tensor that
begins with the prefix::

    full = cat([prefix, cached, new])      first continuing step      (B, kv_heads, P + S + T, D)
    full = cat([full, new])                every later step (contiguous inputs: cat's fast path)
    layer.keys = full[:, :, P:]            a view: the layer holds exactly its real tokens

The attention call gets ``full``; the cache layer keeps a view of its real part, so every
length, position, mask, ``crop`` and reorder the cache reports or performs is prefix-free,
and after detach the next ``DynamicLayer.update`` concatenates onto that view as always.
Compared with the base model a step costs one ``as_strided`` per tensor and ``P`` more keys.

It takes a step over only where that is exactly what ``Cache.update`` would do: the
cache's ``update`` is ``Cache.update`` (no subclass override, no offloading), the layer is a
``DynamicLayer`` (no sliding window, quantization or static buffer), already initialised and
non-empty, and the new states match its dtype, device and batch. A prefill, a foreign layer,
or a prefix that records a gradient goes through the cache's own ``update``.
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


class _Record:
    """What a :class:`PrefixedStorage` last left in one cache layer (updated in place every step)."""

    __slots__ = ("full_key", "full_value", "prefix_key", "prefix_value", "real_key", "real_value")

    def __init__(self, full: tuple[torch.Tensor, torch.Tensor], real: tuple[torch.Tensor, torch.Tensor],
                 prefix: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.set(full, real, prefix)

    def set(self, full: tuple[torch.Tensor, torch.Tensor], real: tuple[torch.Tensor, torch.Tensor],
            prefix: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Remember this step's tensors."""
        self.full_key, self.full_value = full  # (B, kv_heads, P + S, D) each, contiguous
        self.real_key, self.real_value = real  # (B, kv_heads, S, D): the views of the full tensors the layer holds
        self.prefix_key, self.prefix_value = prefix  # the (B, kv_heads, P, D) prefix the full tensors begin with

    def holds(self, layer: DynamicLayer, prefix_key: torch.Tensor, prefix_value: torch.Tensor) -> bool:
        """Whether ``layer`` still holds what was left there, and the prefix is the same."""
        return (
            self.real_key is layer.keys
            and self.real_value is layer.values
            and self.prefix_key is prefix_key
            and self.prefix_value is prefix_value
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
        if record is not None and record.holds(layer, prefix_key, prefix_value):
            # the layer holds what this storage left: append to the full tensors (the copy DynamicLayer makes)
            full_key = torch.cat([record.full_key, key_states], dim=-2)  # (B, kv_heads, P + S + T, D)
            full_value = torch.cat([record.full_value, value_states], dim=-2)
        elif _may_step(layer, key_states, value_states, prefix_key, prefix_value):
            # first continuing step, or the layer was cropped, reordered or written by someone else
            full_key = torch.cat([prefix_key, layer.keys, key_states], dim=-2)  # (B, kv_heads, P + S + T, D)
            full_value = torch.cat([prefix_value, layer.values, value_states], dim=-2)
        else:
            return None
        num_prefix = prefix_key.shape[-2]
        real = _without_prefix(full_key, num_prefix), _without_prefix(full_value, num_prefix)
        layer.keys, layer.values = real
        if record is None:
            self._records[layer] = _Record((full_key, full_value), real, (prefix_key, prefix_value))
        else:
            record.set((full_key, full_value), real, (prefix_key, prefix_value))
        return full_key, full_value

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


def _without_prefix(full: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``full[:, :, P:]`` as one ``as_strided`` (a slice dispatches two operators)."""
    batch, heads, length, dim = full.shape
    stride = full.stride()
    return full.as_strided((batch, heads, length - num_prefix, dim), stride, full.storage_offset() + num_prefix * stride[2])


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
