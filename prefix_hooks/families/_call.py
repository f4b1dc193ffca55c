"""What a family adapter can learn about the model from a root call.

:class:`~prefix_hooks.families.base.ForwardCall` does not carry the root module, but the
per-forward prefix state that the root pre-hook put into the call's keyword arguments
maps the model's attention modules, and those hold the model's (text) config.
"""

from __future__ import annotations

from torch import nn

from prefix_hooks.attention_interposer import STATE_KWARG
from prefix_hooks.families.base import ForwardCall


def attention_module_of(call: ForwardCall) -> nn.Module | None:
    """One attention module of the model that receives ``call``, or ``None`` without a prefix state."""
    state = call.kwargs.get(STATE_KWARG)
    layer_of = getattr(state, "layer_of", None)
    if not layer_of:
        return None
    module = next(iter(layer_of))
    return module if isinstance(module, nn.Module) else None
