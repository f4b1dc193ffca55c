"""``model.save_pretrained(dir)`` writes the attached adapters too, so Trainer checkpoints load.

Trainer saves a checkpoint by calling ``model.save_pretrained(checkpoint_dir, ...)``. While at
least one adapter is attached, :func:`acquire` shadows that method on the model *instance*
(an instance attribute, removed again by the last :func:`release`, the class untouched) with
one that runs the model's own ``save_pretrained`` and then writes the attached adapters
beside its files (:func:`~prefix_hooks.checkpoint.api.save_adapter`: ``adapter_config.json``
and ``adapter_model.safetensors``, one subfolder per adapter when several are attached).
``load_adapter(model, "out/checkpoint-500")`` then works with unchanged training code.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import nn

from prefix_hooks.attachment import Attachment, UndoStack, attachments_of

_NAME = "save_pretrained"
_MISSING = object()
_lock = threading.Lock()
_users: weakref.WeakKeyDictionary[nn.Module, tuple[int, object]] = weakref.WeakKeyDictionary()
"""model -> (attachments using the shadow, the instance attribute it shadowed or _MISSING)."""


def top_level(model: nn.Module) -> list[Attachment]:
    """The attached handles of ``model`` that are not parts of another attached handle, oldest first."""
    attached = attachments_of(model)
    inner = {id(part) for handle in attached for part in getattr(handle, "parts", ())}
    return [handle for handle in attached if id(handle) not in inner]


def _save_with_adapters(model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    from prefix_hooks.checkpoint.api import save_adapter
    from prefix_hooks.compose import MultiAttachment

    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)  # type: ignore[attr-defined]
    handles = top_level(model)
    if handles and kwargs.get("is_main_process", True):
        save_adapter(handles[0] if len(handles) == 1 else MultiAttachment(model, handles), save_directory)
    return result


def acquire(model: nn.Module, undo: UndoStack) -> None:
    """Shadow ``model.save_pretrained`` (refcounted per model) until the pushed undo runs.

    Models without a ``save_pretrained`` (plain ``nn.Module``) are left alone.
    """
    if not callable(getattr(type(model), _NAME, None)):
        return
    with _lock:
        count, shadowed = _users.get(model, (0, _MISSING))
        if count == 0:
            shadowed = model.__dict__.get(_NAME, _MISSING)
            # assigning an existing key keeps the __dict__ order, so restoring it does too
            model.__dict__[_NAME] = lambda save_directory, *args, **kwargs: _save_with_adapters(
                model, save_directory, *args, **kwargs
            )
        _users[model] = (count + 1, shadowed)
    undo.push(lambda: _release(model))


def _release(model: nn.Module) -> None:
    with _lock:
        count, shadowed = _users[model]
        if count > 1:
            _users[model] = (count - 1, shadowed)
            return
        del _users[model]
        if shadowed is _MISSING:
            del model.__dict__[_NAME]
        else:
            model.__dict__[_NAME] = shadowed
