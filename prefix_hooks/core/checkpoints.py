"""The seam between the core and the checkpoint package: what the core needs from folders.

The lifecycle (``handle.save``, ``model.save_pretrained`` while attached), the configs
(``to_json_dict``, ``from_pretrained``, ...) and every ``attach_*(model, path)`` need PEFT's
folder layout, which lives in :mod:`prefix_hooks.checkpoint`, a package above the methods.
Dependencies point down, so the core does not import it: the checkpoint package registers one
:class:`CheckpointFormat` when it is imported (``import prefix_hooks`` always imports it), and
the core asks :func:`checkpoint_format` for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:
    from torch import nn

    from prefix_hooks.core.attachment import Attachment, UndoStack
    from prefix_hooks.core.config import AdapterConfig

A = TypeVar("A", bound="Attachment")
PathLike = str | os.PathLike[str]


class CheckpointFormat(Protocol):
    """What the core asks of the checkpoint package."""

    def config_to_json(self, config: AdapterConfig) -> dict[str, Any]:
        """The ``adapter_config.json`` content of ``config``."""
        ...

    def config_from_dict(self, data: dict[str, Any]) -> AdapterConfig:
        """A config of the class ``data`` names (ours or PEFT's keys)."""
        ...

    def write_config(self, directory: PathLike, data: dict[str, Any]) -> None:
        """Write ``adapter_config.json`` into ``directory``, atomically."""
        ...

    def read_config(self, name_or_path: PathLike, *, subfolder: str | None, revision: str | None) -> dict[str, Any]:
        """The parsed ``adapter_config.json`` of a local folder or hub repository."""
        ...

    def save_adapter(self, attachment: Attachment, directory: PathLike) -> None:
        """Save ``attachment`` in PEFT's folder layout."""
        ...

    def load_adapter_as(self, model: nn.Module, name_or_path: PathLike, expected: type[A], adapter_name: str) -> A:
        """Load the adapter saved at ``name_or_path``, which must be an ``expected``."""
        ...

    def load_adapter(self, model: nn.Module, name_or_path: PathLike, adapter_name: str, *, trainable: bool) -> Attachment:
        """Load the adapter(s) saved at ``name_or_path`` (one handle, or a group for several)."""
        ...

    def shadow_save_pretrained(self, model: nn.Module, undo: UndoStack) -> None:
        """Make ``model.save_pretrained`` also write the adapters until ``undo`` runs."""
        ...


_FORMAT: list[CheckpointFormat] = []


def register_checkpoint_format(checkpoint_format: CheckpointFormat) -> None:
    """Serve :func:`checkpoint_format` with ``checkpoint_format`` (the checkpoint package calls this once)."""
    _FORMAT[:] = [checkpoint_format]


def checkpoint_format() -> CheckpointFormat:
    """The registered checkpoint format.

    Raises:
        RuntimeError: none is registered (only possible when ``prefix_hooks.checkpoint`` was never imported).
    """
    if not _FORMAT:
        raise RuntimeError("no checkpoint format is registered; import prefix_hooks (or prefix_hooks.checkpoint) first")
    return _FORMAT[0]


def built_or_loaded(model: nn.Module, config: object, cls: type[A], adapter_name: str) -> A:
    """What every ``attach_*(model, config_or_path, adapter_name)`` returns: ``cls(model, config,
    adapter_name)`` for a config, or the adapter saved at ``config`` when it is a folder path or
    hub id (loaded frozen; it must be a ``cls``)."""
    if isinstance(config, (str, os.PathLike)):
        return checkpoint_format().load_adapter_as(model, config, cls, adapter_name)
    return cast(Any, cls)(model, config, adapter_name)  # each method's handle takes (model, config, name)
