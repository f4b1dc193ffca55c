"""The edits of the base model most methods make on attach: freeze its parameters and register the
adapter's module under it, each pushing the undo action that reverses it."""

from __future__ import annotations

import functools

from torch import nn

from prefix_hooks.core.attached import attachments_of
from prefix_hooks.core.undo import UndoStack


def freeze_parameters(model: nn.Module, undo: UndoStack) -> None:
    """Set ``requires_grad=False`` on every base parameter of ``model``; undo restores each flag.

    Parameters of the adapters already attached to ``model`` (their ``adapter_modules()``
    and ``trained_base_parameters()``) are left as they are, so methods attached together
    (prefix + LoRA) all stay trainable.
    """
    attached = attachments_of(model)
    adapter_ids = {id(parameter) for attachment in attached for parameter in attachment.parameters()}
    adapter_ids |= {id(parameter) for attachment in attached for parameter in attachment.trained_base_parameters()}
    # recorded by (module, name): a wrapper may replace the parameter objects while attached
    # (FSDP2's fully_shard swaps in DTensor parameters), and the flags belong to whatever is there
    flags = [
        (module, name, parameter.requires_grad)
        for module in model.modules()
        for name, parameter in module._parameters.items()
        if parameter is not None and id(parameter) not in adapter_ids
    ]

    undo.push(functools.partial(_restore_flags, flags))
    for module, name, _ in flags:
        module._parameters[name].requires_grad_(False)  # type: ignore[union-attr]


def _restore_flags(flags: list[tuple[nn.Module, str, bool]]) -> None:
    for module, name, flag in flags:
        parameter = module._parameters.get(name)
        if parameter is not None:
            parameter.requires_grad_(flag)


def register_child(model: nn.Module, name: str, child: nn.Module, undo: UndoStack) -> None:
    """Register ``child`` under ``model`` so ``model.parameters()`` yields its parameters.

    Raises:
        ValueError: ``name`` is already an attribute of ``model``.
    """
    if hasattr(model, name):
        raise ValueError(f"cannot register the adapter as {name!r}: {type(model).__name__} already has that attribute")
    model._modules[name] = child  # appended last, so parameter order before it is unchanged
    undo.push(functools.partial(_unregister_child, model, name))


def _unregister_child(model: nn.Module, name: str) -> None:
    del model._modules[name]
