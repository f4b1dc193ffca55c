"""One call's arguments, addressable by parameter name.

A shadowed root ``forward`` (prefix, prompt) sees ``(*args, **kwargs)``; :class:`ForwardCall`
reads and replaces an argument by the parameter name of the real ``forward``, wherever the
caller put it (positionally or by keyword).
"""

from __future__ import annotations

from typing import Any

from torch import nn


class ForwardCall:
    """The root module's call as its shadowed ``forward`` sees it: read and replace arguments by name.

    Args:
        params: the root ``forward``'s parameter names, in order.
        args, kwargs: the call's arguments (``kwargs`` is modified in place by :meth:`set`).
        module: the root module being called.
    """

    def __init__(
        self, params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], module: nn.Module | None = None
    ) -> None:
        self.params = params
        self.args = args
        self.kwargs = kwargs
        self.module = module
        """The root module being called (its ``config`` included), when known."""

    def accepts(self, name: str) -> bool:
        """Whether ``forward`` takes ``name`` (as a named parameter or through ``**kwargs``)."""
        return name in self.params

    def get(self, name: str) -> Any:
        """The argument ``name`` as passed positionally or by keyword, else ``None``."""
        if name in self.kwargs:
            return self.kwargs[name]
        if name in self.params:
            index = self.params.index(name)
            if index < len(self.args):
                return self.args[index]
        return None

    def set(self, name: str, value: Any) -> None:
        """Pass ``value`` as ``name``: in its positional slot if it was passed there, else by keyword."""
        if name in self.params:
            index = self.params.index(name)
            if index < len(self.args) and name not in self.kwargs:
                self.args = (*self.args[:index], value, *self.args[index + 1 :])
                return
        self.kwargs[name] = value
