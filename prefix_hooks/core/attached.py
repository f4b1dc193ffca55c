"""Which attachments each model carries now: :func:`attachments_of`, and the bookkeeping an attach,
a detach and a copy of an attached model do on it.

Attachments made by copying a model are held weakly: the copy's own shadows keep them alive, and a
strong entry would keep the copy (its weak key) alive forever through the attachment's reference
to it.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING

from torch import nn

from prefix_hooks.core.undo import UndoStack

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import Attachment

# model -> attachments currently attached to it, oldest first
_attached: weakref.WeakKeyDictionary[nn.Module, list[Attachment | weakref.ref[Attachment]]] = (
    weakref.WeakKeyDictionary()
)
_attached_lock = threading.Lock()


def _resolve(entry: Attachment | weakref.ref[Attachment]) -> Attachment | None:
    return entry() if isinstance(entry, weakref.ref) else entry


def attachments_of(model: nn.Module) -> list[Attachment]:
    """The attachments currently attached to ``model``, oldest first (on a copy of an attached model:
    the copy's own attachments, which detach without touching the original)."""
    with _attached_lock:
        found = (_resolve(entry) for entry in _attached.get(model, ()))
        return [attachment for attachment in found if attachment is not None]


def track(attachment: Attachment, undo: UndoStack) -> None:
    """Record ``attachment`` as attached to its model (last); ``undo`` forgets it again."""
    with _attached_lock:
        _attached.setdefault(attachment.model, []).append(attachment)
    undo.push(functools.partial(untrack, attachment))


def track_copy(attachment: Attachment) -> None:
    """Record ``attachment``, made by copying an attached model, as attached to its model (weakly)."""
    with _attached_lock:
        _attached.setdefault(attachment.model, []).append(weakref.ref(attachment))


def untrack(attachment: Attachment) -> None:
    """Forget ``attachment`` (and the entries of copies that are gone)."""
    with _attached_lock:
        stack = _attached.get(attachment.model, [])
        stack[:] = [entry for entry in stack if _resolve(entry) not in (attachment, None)]
        if not stack:
            _attached.pop(attachment.model, None)
