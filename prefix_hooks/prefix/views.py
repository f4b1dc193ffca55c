"""Each layer's prefix as the attention call consumes it, built once and reused across forwards.

A decode step needs, per layer, the prefix keys and values expanded over the batch
and cast to the query's dtype. Building those views costs about ten small tensor
operations per layer, every step, although during ``generate()`` neither the encoder
output nor the batch size changes. :class:`LayerViews` keeps them for as long as their
source tensor is the same object with the same version counter (an in-place optimizer
step bumps it) and records no autograd graph; anything that needs a gradient is built fresh.
"""

from __future__ import annotations

import torch

from prefix_hooks.core.parameter_versions import optimizer_steps


class LayerViews:
    """Memo of per-layer prefix views of one ``(L, 2, kv_heads, P, D)`` source tensor."""

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._version: tuple[int, int] = (-1, -1)
        self._views: dict[tuple[int, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def get(self, kv: torch.Tensor, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values from ``kv``, each ``(batch, kv_heads, P, D)`` in ``dtype``.

        The result is an expanded view (no copy over the batch); do not write into it.
        """
        if kv.requires_grad and torch.is_grad_enabled():  # a graph must be recorded per forward: never reuse
            return expanded(kv[layer, 0], batch, dtype), expanded(kv[layer, 1], batch, dtype)
        version = (kv._version, optimizer_steps())  # fused optimizers do not bump _version
        if kv is not self._source or version != self._version:
            self._source, self._version = kv, version
            self._views.clear()
        views = self._views.get((batch, dtype))
        if views is None:
            views = [(expanded(keys, batch, dtype), expanded(values, batch, dtype)) for keys, values in kv]
            self._views[(batch, dtype)] = views
        return views[layer]

    def clear(self) -> None:
        """Drop every memoized view (and the reference to the source)."""
        self._source, self._version = None, (-1, -1)
        self._views.clear()


def expanded(prefix: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``(kv_heads, P, D)`` -> ``(batch, kv_heads, P, D)`` in ``dtype``: an expanded view, no copy over the batch."""
    return prefix.to(dtype)[None].expand(batch, -1, -1, -1)  # (B, kv_heads, P, D)
