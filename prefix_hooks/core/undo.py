"""Undo actions: the :class:`UndoStack` an attach pushes to, and :class:`Hold`, the undo action of a
process-wide refcounted resource.

Every mutation an attach makes pushes the action that reverses it; detach unwinds the stack. The
actions are bound methods, ``functools.partial`` of module-level functions, or Holds (never
closures), so a copy of an attached model rebuilds them against the copy
(:mod:`prefix_hooks.core.copies`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any


class UndoStack:
    """Undo actions run last-in first-out; every action runs even if one fails."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def unwind(self) -> None:
        """Run every action in reverse; re-raise the first failure after all have run."""
        first_error: BaseException | None = None
        while self._actions:
            action = self._actions.pop()
            try:
                action()
            except BaseException as error:  # noqa: BLE001 - restoration must finish first
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def actions(self) -> list[Callable[[], None]]:
        """The pending actions, in the order they were pushed."""
        return list(self._actions)


_hold_lock = threading.Lock()


class Hold:
    """One count of a process-wide, refcounted resource (acquired now); calling it releases the count.

    Used as the undo action of ``acquire()`` / ``release()`` pairs (the attention interposer, the
    optimizer-step counter). A copy of an attached model (``copy.deepcopy``, unpickling) rebuilds
    its Holds, which acquires again: the copy's detach releases the copy's counts, never the
    original's. Releasing twice is a no-op (a copy dropped without detach releases from a finalizer).
    """

    __slots__ = ("_acquire", "_held", "_release")

    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        acquire()
        self._acquire, self._release, self._held = acquire, release, True

    def __call__(self) -> None:
        with _hold_lock:
            held, self._held = self._held, False
        if held:
            self._release()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Hold, (self._acquire, self._release))


def release_holds(holds: Iterable[Hold]) -> None:
    """Release each of ``holds`` (those already released are skipped)."""
    for hold in holds:
        hold()
