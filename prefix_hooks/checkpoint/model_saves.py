"""``model.save_pretrained(dir)`` writes the attached adapters too, so Trainer checkpoints load.

Trainer saves a checkpoint by calling ``model.save_pretrained(checkpoint_dir, ...)``. While at
least one adapter is attached, :func:`acquire` shadows that method on the model *instance*
(an instance attribute, removed again when the model's last attachment detaches, the class
untouched; a copy of the model gets its own, bound to the copy) with
one that runs the model's own ``save_pretrained`` and then writes the attached adapters
beside its files (:func:`~prefix_hooks.checkpoint.api.save_adapter`: ``adapter_config.json``
and ``adapter_model.safetensors``, one subfolder per adapter when several are attached).
``load_adapter(model, "out/checkpoint-500")`` then works with unchanged training code.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from torch import nn

from prefix_hooks.core.attachment import Attachment, UndoStack, attachments_of
from prefix_hooks.core.shadows import MISSING, restore_attribute

_NAME = "save_pretrained"
_lock = threading.Lock()


def top_level(model: nn.Module) -> list[Attachment]:
    """The attached handles of ``model`` that are not parts of another attached handle, oldest first."""
    attached = attachments_of(model)
    inner = {id(part) for handle in attached for part in getattr(handle, "parts", ())}
    return [handle for handle in attached if id(handle) not in inner]


def _save_with_adapters(model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    from prefix_hooks.checkpoint.api import save_adapter
    from prefix_hooks.core.compose import MultiAttachment

    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)  # type: ignore[attr-defined]
    handles = top_level(model)
    if handles and kwargs.get("is_main_process", True):
        save_adapter(handles[0] if len(handles) == 1 else MultiAttachment(model, handles), save_directory)
    return result


class SavePretrainedWithAdapters:
    """``model.save_pretrained`` while adapters are attached (copied with the model, bound to the copy).

    Attributes:
        model: the model.
        shadowed: the instance attribute it shadows (``MISSING``: none).
    """

    def __init__(self, model: nn.Module, shadowed: Any) -> None:
        self.model = model
        self.shadowed = shadowed

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        return _save_with_adapters(self.model, save_directory, *args, **kwargs)


def acquire(model: nn.Module, undo: UndoStack) -> None:
    """Shadow ``model.save_pretrained`` until the pushed undo of the last attachment of ``model`` runs.

    Models without a ``save_pretrained`` (plain ``nn.Module``) are left alone.
    """
    if not callable(getattr(type(model), _NAME, None)):
        return
    with _lock:
        current = model.__dict__.get(_NAME, MISSING)
        if not isinstance(current, SavePretrainedWithAdapters):
            # assigning an existing key keeps the __dict__ order, so restoring it does too
            model.__dict__[_NAME] = SavePretrainedWithAdapters(model, current)
    undo.push(functools.partial(_release, model))


def _release(model: nn.Module) -> None:
    """The undo of :func:`acquire`, run while the releasing attachment is still tracked: the shadow
    goes when no other attachment of ``model`` remains (counted on the model, so a copy of the model
    counts its own attachments)."""
    with _lock:
        current = model.__dict__.get(_NAME)
        if not isinstance(current, SavePretrainedWithAdapters) or len(attachments_of(model)) > 1:
            return
        restore_attribute(model, _NAME, current.shadowed)
