"""One interposer on transformers' attention-function registry.

Attention modules of most families call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_default)``
and then the returned function with ``(module, query, key, value, mask, **kwargs)``.
While any prefix is attached, ``get_interface`` is shadowed on the registry instance
by a function that returns a thin wrapper around whatever the registry would have
returned (the model file's own eager function included). The wrapper pops the
per-forward :class:`SpliceSource` that the root's forward put into ``**kwargs`` and, if
it has a prefix for the calling module, splices it in; any other call passes straight
through unchanged.

Carrying the per-forward state in the call's keyword arguments (instead of a global
registry) keeps concurrent forwards on different threads apart, and gradient
checkpointing's recomputation sees exactly the tensors of the original forward
(``GradientCheckpointingLayer`` captures the layer's kwargs).

The shadow is installed on the first attach and removed on the last detach, leaving
the registry's ``__dict__`` exactly as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefix_hooks.prefix.architecture import SpliceSource
from prefix_hooks.prefix.merged_attention import merged_attention
from prefix_hooks.prefix.fused_prefill import lower_right_prefill
from prefix_hooks.prefix.splice import Backend, backend_of, extended_mask, splice_prefix, wants_causal

STATE_KWARG = "prefix_hooks_state"
"""Name of the keyword argument that carries the per-forward state to the layers."""


_lock = threading.Lock()
_users = 0
_wrappers: dict[tuple[str | None, Callable[..., Any]], Callable[..., Any]] = {}


def _wrap(backend: Backend, attn_implementation: str | None, function: Callable[..., Any]) -> Callable[..., Any]:
    def attention_with_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              *args: Any, **kwargs: Any) -> Any:
        state: SpliceSource | None = kwargs.pop(STATE_KWARG, None)
        if state is None:
            return function(module, query, key, value, *args, **kwargs)
        carried = state.carried_prefix(key)  # (slot, P) when the cache returned key with a prefix in front
        if carried is not None:
            slot, num_prefix = carried
            mask = args[0] if args else kwargs.get("attention_mask")
            if slot == state.slot_of(module) and (query.shape[2] == 1 or mask is not None):
                state.count_spliced()  # the decode step of prefixed_cache: attention over [prefix; real] as is
                if mask is None:
                    return function(module, query, key, value, *args, **kwargs)
                mask = extended_mask(mask, num_prefix, state.mask_cache)
                if args:
                    return function(module, query, key, value, mask, *args[1:], **kwargs)
                return function(module, query, key, value, **{**kwargs, "attention_mask": mask})
            # another layer's prefix, or sdpa's implicit causal pattern: attend from the real part
            key, value = key[:, :, num_prefix:], value[:, :, num_prefix:]  # (B, kv_heads, S, D)
        prefix = state.prefix_for(module, query.shape[0], query.dtype)  # (B, kv_heads, P, D) each
        if prefix is None:
            return function(module, query, key, value, *args, **kwargs)
        if backend is Backend.UNSUPPORTED:
            raise ValueError(
                f"attention implementation {attn_implementation!r} is not supported with a prefix; "
                "use one of 'eager', 'sdpa', 'flex_attention', 'flash_attention_2/3/4'"
            )
        if args:
            mask, rest = args[0], args[1:]
        else:
            mask, rest = kwargs.pop("attention_mask", None), ()
        if backend is Backend.SDPA:
            merged = merged_attention(module, query, key, value, mask, prefix, kwargs, state.mask_cache)
            if merged is not None:
                return merged
            if mask is None and query.shape[2] > 1 and wants_causal(module, kwargs):  # a causal prefill off the CPU
                fused = lower_right_prefill(query, key, value, prefix, kwargs)
                if fused is not None:
                    return fused
        key, value, mask = splice_prefix(backend, module, query, key, value, mask, prefix, kwargs, state.mask_cache)
        return function(module, query, key, value, mask, *rest, **kwargs)

    attention_with_prefix.__wrapped__ = function  # type: ignore[attr-defined]
    return attention_with_prefix


def _get_interface(attn_implementation: str | None, default: Callable[..., Any]) -> Callable[..., Any]:
    # transformers accepts None here (it warns and returns the default)
    function = type(ALL_ATTENTION_FUNCTIONS).get_interface(
        ALL_ATTENTION_FUNCTIONS, attn_implementation, default  # type: ignore[arg-type]
    )
    cache_key = (attn_implementation, function)
    wrapper = _wrappers.get(cache_key)
    if wrapper is None:
        wrapper = _wrappers[cache_key] = _wrap(backend_of(attn_implementation), attn_implementation, function)
    return wrapper


def acquire() -> None:
    """Count one more user; the first one installs the interposer."""
    global _users
    with _lock:
        if _users == 0:
            if "get_interface" in vars(ALL_ATTENTION_FUNCTIONS):
                raise RuntimeError("ALL_ATTENTION_FUNCTIONS.get_interface is already shadowed by someone else")
            ALL_ATTENTION_FUNCTIONS.get_interface = _get_interface  # type: ignore[method-assign]
        _users += 1


def release() -> None:
    """Count one user less; the last one removes the interposer."""
    global _users
    with _lock:
        if _users == 0:
            raise RuntimeError("attention interposer released more often than acquired")
        _users -= 1
        if _users == 0:
            del vars(ALL_ATTENTION_FUNCTIONS)["get_interface"]
            _wrappers.clear()


def is_installed() -> bool:
    """Whether the interposer is currently installed."""
    return "get_interface" in vars(ALL_ATTENTION_FUNCTIONS)
