"""The decorator form of a context manager: ``@handle`` attaches the adapter while the function runs.

Generators, async generators and coroutines stay inside the context until they finish, not just
until they are created. ``wrapt`` keeps the wrapped function's signature, name and descriptor
behaviour (methods, classmethods).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast

import wrapt

F = TypeVar("F", bound=Callable[..., Any])


def entered_while_running(context: AbstractContextManager[Any], wrapped: F) -> F:
    """``wrapped``, entering ``context`` around each call (each iteration of a generator, until it finishes)."""
    if inspect.isasyncgenfunction(wrapped):

        @wrapt.decorator
        async def async_gen_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with context:
                async for item in wrapped(*args, **kwargs):
                    yield item

        return cast(F, async_gen_wrapper(wrapped))
    if inspect.iscoroutinefunction(wrapped):

        @wrapt.decorator
        async def coroutine_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with context:
                return await wrapped(*args, **kwargs)

        return cast(F, coroutine_wrapper(wrapped))
    if inspect.isgeneratorfunction(wrapped):

        @wrapt.decorator
        def generator_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with context:
                return (yield from wrapped(*args, **kwargs))

        return cast(F, generator_wrapper(wrapped))

    @wrapt.decorator
    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        with context:
            return wrapped(*args, **kwargs)

    return cast(F, wrapper(wrapped))
