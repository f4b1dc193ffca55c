"""The cache one attention call sees, with the prefix in front: for attention modules the interposer cannot serve.

GPT-Neo, BLOOM and MPT (and, up to transformers 5.23, Falcon, GPT-J and CodeGen) compute
attention inline, so the attention-function interposer never sees them; 5.25's Falcon calls
the registry, but its layers do not pass the per-forward state down and its alibi lives in
the mask (see ``prefix_hooks.families.falcon``). What they all do call is
``cache.update(key, value, layer_idx)``, right before attention, with keys already
rotated (RoPE) and laid out ``(B, kv_heads, T, D)``. A forward pre-hook on each
attention module therefore swaps its cache argument for a :class:`PrefixCacheView`:

* ``update()`` writes only the real tokens into the real cache and returns
  ``cat(prefix, real)`` along the sequence axis, so the module attends over
  ``P + S`` keys while the cache keeps holding ``S`` (a decode step of a ``DynamicCache``
  makes that one copy through :class:`~prefix_hooks.prefix.prefixed_cache.PrefixedStorage`);
* without a cache (``use_cache=False``, training) the module still gets a view, over
  an empty stand-in that stores nothing, so the prefix is spliced there too;
* everything else (``get_seq_length()``, ``isinstance(view, DynamicCache)``, ...)
  is the real cache's, through ``wrapt.ObjectProxy``.

The cache argument's name comes from the module's ``forward`` signature (``layer_past``,
``past_key_values`` or, since 5.24, ``cache``). The family then widens the mask and the
alibi arguments by ``P`` columns (see ``prefix_hooks.families._inline``); this module
knows nothing about masks.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import wrapt
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import CACHE_KEYWORDS, cache_keyword, find_cache, forward_parameters
from prefix_hooks.prefix.architecture import AttentionSite, CurrentState, SpliceSource
from prefix_hooks.prefix.prefixed_cache import PrefixedStorage, steps_over

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack

ExtendArguments = Callable[[nn.Module, ForwardCall, int, SpliceSource], None]
StoredPrefix = tuple[PrefixedStorage, Callable[[int, torch.dtype], "tuple[torch.Tensor, torch.Tensor] | None"]]
"""The state's storage and ``(batch, dtype) -> (B, kv_heads, P, D)`` prefix views of one module (``None``: do not store)."""
"""``(module, call, P, state)``: widen the call's mask/alibi arguments by ``P`` prefix columns."""


def prepend_prefix(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Put one layer's prefix in front of a call's keys or values.

    Args:
        prefix: ``(kv_heads, P, D)``, any dtype/device (cast to ``states``').
        states: ``(B, kv_heads, S, D)``.

    Returns:
        ``(B, kv_heads, P + S, D)``; the prefix is expanded over the batch, never copied per row
        before the concatenation.
    """
    if prefix.shape[0] != states.shape[1] or prefix.shape[2] != states.shape[3]:
        raise ValueError(
            f"prefix of shape {tuple(prefix.shape)} (kv_heads, P, D) does not fit keys of shape "
            f"{tuple(states.shape)} (B, kv_heads, S, D)"
        )
    prefix = prefix.to(dtype=states.dtype, device=states.device)
    batch = states.shape[0]
    return torch.cat([prefix[None].expand(batch, -1, -1, -1), states], dim=2)  # (B, kv_heads, P + S, D)


class NoCache:
    """Stands in for the cache of a call made without one: stores nothing, holds nothing."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class PrefixCacheView(wrapt.ObjectProxy):
    """One attention call's view of a cache: ``update()`` returns the prefix in front of the real entries.

    Args:
        cache: the real cache (written through, real tokens only) or ``None`` for a call without one.
        prefix_key, prefix_value: ``(kv_heads, P, D)`` each.
    """

    def __init__(self, cache: Any, prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                 stored: StoredPrefix | None = None) -> None:
        super().__init__(NoCache() if cache is None else cache)
        self._self_prefix_key = prefix_key
        self._self_prefix_value = prefix_value
        self._self_stored = stored if steps_over(cache) else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, kv_heads, T, D)`` keys/values to the real cache; return ``(B, kv_heads, P + S, D)`` each.

        A decode step of a ``DynamicCache`` goes through the state's :class:`PrefixedStorage`
        (one copy, as the base model's, instead of two)."""
        if self._self_stored is not None:
            storage, batched = self._self_stored
            prefix = batched(key_states.shape[0], key_states.dtype)  # (B, kv_heads, P, D) each
            if prefix is not None:
                stepped = storage.update(self.__wrapped__, layer_idx, key_states, value_states, *prefix)
                if stepped is not None:
                    return stepped
        keys, values = self.__wrapped__.update(key_states, value_states, layer_idx, *args, **kwargs)
        return prepend_prefix(self._self_prefix_key, keys), prepend_prefix(self._self_prefix_value, values)


def install_cache_view_hooks(
    sites: list[AttentionSite],
    current_state: CurrentState,
    undo: UndoStack,
    extend_arguments: ExtendArguments,
) -> None:
    """Register, on every site's module, a pre-hook that hands it a :class:`PrefixCacheView`.

    The hook does nothing while no prefix state is current (detached, disabled) or when the
    state has no prefix for the module; otherwise it fetches the module's prefix (which counts
    the layer as spliced), replaces the cache argument (found under any spelling, given
    positionally or by keyword, and passed on under the name the module's ``forward`` takes)
    by a view over it, and lets ``extend_arguments`` widen the mask/alibi arguments.

    The per-forward state the root put into ``**kwargs`` for the attention-function interposer
    is taken out of the module's call: the view splices this module's prefix, so an attention
    function it calls through the registry must not splice it a second time.

    Args:
        sites: the attention modules.
        current_state: the attachment's per-forward state accessor.
        undo: receives each hook's removal.
        extend_arguments: the family's mask/alibi widening.

    Raises:
        ValueError: a module's ``forward`` takes no cache argument under any known name.
    """
    # imported here: the interposer imports the family registry, which imports this module
    from prefix_hooks.prefix.interposer import STATE_KWARG

    for site in sites:
        params = forward_parameters(site.module)
        cache_parameter = cache_keyword(params)
        if cache_parameter is None:
            raise ValueError(
                f"{type(site.module).__name__}.forward takes no cache argument (known names: "
                f"{', '.join(CACHE_KEYWORDS)}); parameters: {params}"
            )

        # a partial, not a closure: a copy of the attached model rebinds it to the copy's state
        pre_hook = functools.partial(_hand_view, current_state, extend_arguments, params, cache_parameter, STATE_KWARG)
        handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        undo.push(handle.remove)


def _hand_view(
    current_state: CurrentState,
    extend_arguments: ExtendArguments,
    params: list[str],
    cache_parameter: str,
    state_kwarg: str,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The pre-hook of :func:`install_cache_view_hooks` on one attention module (``state_kwarg``: the
    interposer's keyword, taken out of the call)."""
    state = current_state()
    if state is None:
        return None
    prefix = state.prefix_for(module)
    if prefix is None:
        return None
    prefix_key, prefix_value = prefix  # (kv_heads, P, D) each
    call = ForwardCall(params, args, dict(kwargs), module=module)
    call.kwargs.pop(state_kwarg, None)
    given_as, cache = find_cache(call)
    if given_as is not None and given_as != cache_parameter and given_as in call.kwargs:
        del call.kwargs[given_as]  # an old spelling: pass the view under the module's own name only
    stored = (state.storage, functools.partial(state.stored_prefix, module))
    call.set(cache_parameter, PrefixCacheView(cache, prefix_key, prefix_value, stored))
    extend_arguments(module, call, int(prefix_key.shape[1]), state)
    return call.args, call.kwargs
