"""PEFT's folder layout as the core's :class:`~prefix_hooks.core.checkpoints.CheckpointFormat`.

Registered when :mod:`prefix_hooks.checkpoint` is imported; each method's ``attach_*(model, path)``,
``handle.save``, the configs' ``save_pretrained``/``from_pretrained`` and the ``save_pretrained``
shadow reach this package only through it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from prefix_hooks.checkpoint import model_saves
from prefix_hooks.checkpoint.api import load_adapter, load_adapter_as, save_adapter
from prefix_hooks.checkpoint.configs import config_from_dict, config_to_json
from prefix_hooks.checkpoint.folder import read_config, write_config
from prefix_hooks.checkpoint.hub import resolve_folder
from prefix_hooks.core.attachment import Attachment, UndoStack
from prefix_hooks.core.checkpoints import PathLike
from prefix_hooks.core.config import AdapterConfig

A = TypeVar("A", bound=Attachment)


class PeftFolderFormat:
    """Adapters and configs in PEFT's folder layout (``adapter_config.json`` + safetensors)."""

    def config_to_json(self, config: AdapterConfig) -> dict[str, Any]:
        return config_to_json(config)

    def config_from_dict(self, data: dict[str, Any]) -> AdapterConfig:
        return config_from_dict(data)

    def write_config(self, directory: PathLike, data: dict[str, Any]) -> None:
        write_config(directory, data)

    def read_config(self, name_or_path: PathLike, *, subfolder: str | None, revision: str | None) -> dict[str, Any]:
        folder = resolve_folder(name_or_path, subfolder=subfolder, revision=revision, what="adapter_config.json")
        return read_config(folder)

    def save_adapter(self, attachment: Attachment, directory: PathLike) -> None:
        save_adapter(attachment, directory)

    def load_adapter_as(self, model: nn.Module, name_or_path: PathLike, expected: type[A], adapter_name: str) -> A:
        return load_adapter_as(model, name_or_path, expected, adapter_name)

    def load_adapter(self, model: nn.Module, name_or_path: PathLike, adapter_name: str, *, trainable: bool) -> Attachment:
        return load_adapter(model, name_or_path, adapter_name, trainable=trainable)

    def shadow_save_pretrained(self, model: nn.Module, undo: UndoStack) -> None:
        model_saves.acquire(model, undo)
