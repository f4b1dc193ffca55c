"""Copies of an attached model carry their own adapter: what :class:`~prefix_hooks.core.attachment.Attachment`
copies of itself, and what it refuses to copy.

``copy.deepcopy`` (an EMA copy, ``torch.optim.swa_utils.AveragedModel``) and ``pickle`` / ``torch.save``
of an attached model give a model that carries its own attached adapter: the adapter's modules are
copied with the model, the copy's hooks and shadows run the copy's attachment, and
``attachments_of(copy)`` holds it, so it detaches on its own and leaves the original alone. This works
because everything an attachment leaves in the model and every undo action is rebuilt by the copy with
references to the copy (bound methods, ``functools.partial`` of module-level functions,
:class:`~prefix_hooks.core.undo.Hold`; never closures): an attachment whose undo actions or hooks are
not (:func:`copy_blockers`) refuses to be copied, with an error naming the step.
"""

from __future__ import annotations

import contextvars
import functools
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch.utils.hooks import RemovableHandle

from prefix_hooks.core.undo import Hold, UndoStack, release_holds


class _FreshContextVar:
    """In a copied attachment's state: a per-thread variable to create anew (``default=None``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FreshContextVar, (self.name,))


def _closure_free(function: object) -> bool:
    return isinstance(function, types.FunctionType) and function.__closure__ is None


def _not_rebound(action: Callable[[], None]) -> str | None:
    """Why the undo ``action`` of an attached model would still act on the original in a copy, else ``None``.

    Rebound: a :class:`Hold`; a bound method (its object is copied with the model), unless it removes
    a hook that is a closure; a ``functools.partial`` of a module-level function or bound method (its
    arguments are copied). Not rebound: closures and lambdas (copied as the same function object, with
    the original's cells), bare functions (they act on process state a copy does not hold).
    """
    if isinstance(action, Hold):
        return None
    if isinstance(action, functools.partial) and (
        _closure_free(action.func) or isinstance(action.func, types.MethodType)
    ):
        return None
    if isinstance(action, types.MethodType) and _closure_free(action.__func__):
        handle = action.__self__
        if isinstance(handle, RemovableHandle):
            hooks = handle.hooks_dict_ref()
            hook = None if hooks is None else hooks.get(handle.id)
            if isinstance(hook, types.FunctionType) and hook.__closure__ is not None:
                return f"the hook {hook.__qualname__} (a closure)"
        return None
    return f"the detach step {getattr(action, '__qualname__', repr(action))}"


def copy_blockers(undo: UndoStack | None) -> list[str]:
    """The undo actions in ``undo`` (and the hooks they remove) that a copy could not rebind to itself,
    each as the words an error names it with."""
    if undo is None:
        return []
    return [reason for action in undo.actions() if (reason := _not_rebound(action)) is not None]


def copyable_state(state: Mapping[str, Any], dropped: Iterable[str]) -> dict[str, Any]:
    """``state`` (an attachment's ``__dict__``) without the ``dropped`` attributes, its ``ContextVar``s
    replaced by markers that :func:`restored_state` turns into fresh, empty ones."""
    copied = dict(state)
    for name in dropped:
        copied.pop(name, None)
    return {
        name: _FreshContextVar(value.name) if isinstance(value, contextvars.ContextVar) else value
        for name, value in copied.items()
    }


def restored_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy's ``state`` with a new, empty ``ContextVar`` (``default=None``) for each marker."""
    return {
        name: contextvars.ContextVar(value.name, default=None) if isinstance(value, _FreshContextVar) else value
        for name, value in state.items()
    }


def release_holds_when_dropped(owner: object, undo: UndoStack) -> None:
    """Release the :class:`Hold` counts in ``undo`` when ``owner`` (a copy's attachment) is garbage
    collected without a detach."""
    holds = [action for action in undo.actions() if isinstance(action, Hold)]
    weakref.finalize(owner, release_holds, holds)
