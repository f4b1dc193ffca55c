"""The cache a prompt-tuned model returns: the real cache, whose first ``P`` positions are the
virtual tokens, seen by its callers as if it held the real tokens only.

``generate()`` (and a hand-written decode loop) reads ``cache.get_seq_length()`` to decide which
of the tokens it holds are new and where their positions start. Counting the virtual tokens
there made a continued ``generate(sequences, cache=out.cache)`` feed ``P`` already cached tokens
a second time. So the model output carries a :class:`PromptCacheView`:

* ``get_seq_length()`` counts the real tokens (``crop()`` takes a real-token length);
* the prompt's pre-hook hands the model's layers the real cache (:func:`real_cache`), so they
  keep seeing every position;
* reaching a layer through anything else (the prompt disabled or detached) raises in
  ``update()`` instead of computing with positions the mask does not know about;
* everything else (``isinstance(view, DynamicCache)``, ``reorder_cache()``, ...) is the real
  cache's, through ``wrapt.ObjectProxy``.
"""

from __future__ import annotations

from typing import Any

import torch
import wrapt
from transformers.cache_utils import Cache


class PromptCacheView(wrapt.ObjectProxy):
    """A cache holding a prompt's ``P`` virtual tokens in front, with lengths counted without them.

    Args:
        cache: the real cache (its first ``num_virtual`` positions are the virtual tokens).
        num_virtual: ``P``.
        adapter_name: the prompt's adapter, named in errors.
    """

    def __init__(self, cache: Any, num_virtual: int, adapter_name: str) -> None:
        super().__init__(cache)
        self._self_num_virtual = num_virtual
        self._self_adapter_name = adapter_name

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Real tokens cached (the virtual ones are not counted)."""
        return max(int(self.__wrapped__.get_seq_length(layer_idx)) - self._self_num_virtual, 0)

    def crop(self, max_length: int) -> None:
        """Keep the virtual tokens and the first ``max_length`` real ones (negative: drop ``-max_length``)."""
        self.__wrapped__.crop(max_length + self._self_num_virtual if max_length >= 0 else max_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            f"this cache holds the {self._self_num_virtual} virtual tokens of the prompt "
            f"{self._self_adapter_name!r}; continue it with that prompt attached and enabled (or start from an "
            "empty cache)"
        )


def real_cache(cache: Any) -> Any:
    """The cache behind a :class:`PromptCacheView` (``cache`` itself otherwise)."""
    return cache.__wrapped__ if isinstance(cache, PromptCacheView) else cache


def filled_cache(cache: object, keyword: str | None) -> Cache | None:
    """``cache`` (passed as ``keyword``) if it already holds positions, ``None`` if it is absent or empty.

    Raises:
        TypeError: ``cache`` is not a transformers ``Cache``.
    """
    if cache is None:
        return None
    if not isinstance(cache, Cache):
        raise TypeError(
            f"{keyword} of type {type(cache).__name__} is not accepted with prompt tuning; expected a "
            "transformers Cache (e.g. DynamicCache)"
        )
    return cache if cache.get_seq_length() else None
