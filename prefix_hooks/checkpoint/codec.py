"""The codec interface: how one adapter method maps to PEFT's saved files and back.

A codec turns a handle into a :class:`SavedAdapter` (what goes into the folder) and a
:class:`SavedAdapter` plus our config object back into a validated, *not attached* handle.
The folder format itself (atomic writes, safety checks, hub downloads) lives in
:mod:`prefix_hooks.checkpoint.folder` / :mod:`prefix_hooks.checkpoint.hub`; codecs never touch files.

Folder layout (PEFT's, plus one file PEFT ignores)::

    adapter_config.json              SavedAdapter.config (PEFT's keys; ours under config["prefix_hooks"])
    adapter_model.safetensors        SavedAdapter.tensors (PEFT's key names)
    prefix_hooks_extra.safetensors   SavedAdapter.extra (written only when non-empty)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prefix_hooks.core.attachment import Attachment

EXTRA_CONFIG_KEY = "prefix_hooks"
"""Our extra config values (position_offset, layouts, trainable-form flags, format version) live
under this one key of adapter_config.json; PEFT's loaders ignore it."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EXTRA_WEIGHTS_NAME = "prefix_hooks_extra.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


@dataclass
class SavedAdapter:
    """One adapter's saved content, as read from or written to a folder.

    Attributes:
        config: the adapter_config.json dict: ``config.to_dict()`` of our config (PEFT's key names),
            with method-specific extra values under ``config[EXTRA_CONFIG_KEY]`` (a dict).
        tensors: adapter_model.safetensors, keyed by PEFT's saved names (e.g. ``"prompt_embeddings"``,
            ``"base_model.model.<path>.lora_A.weight"``); contiguous CPU tensors when written.
        extra: prefix_hooks_extra.safetensors: what PEFT has no place for (unfolded projection
            MLP, P-tuning head, ...); ``{}`` means the file is not written.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Codec(Protocol):
    """Maps one family of adapter methods to PEFT's saved layout."""

    config_types: tuple[type, ...]
    """Our config classes this codec handles (``PrefixTuningConfig``, ...)."""
    peft_types: tuple[str, ...]
    """PEFT ``peft_type`` strings it reads (``"PREFIX_TUNING"``, ...)."""

    def save(self, handle: Attachment) -> SavedAdapter:
        """The saved form of ``handle`` (attached or not); must not mutate the handle or the model."""
        ...

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> Attachment:
        """A validated, NOT attached handle on ``model`` holding the saved values.

        Args:
            model: the base model to adapt.
            config: our config object, built from ``saved.config`` by the caller.
            saved: the folder's content (``saved.config`` still holds the raw dict, extra keys included).
            adapter_name: name of the new handle.
            trainable: rebuild the trainable (unfolded) form when ``saved.extra`` allows it; otherwise
                the inference form.

        Raises:
            ValueError: naming the key, its shape and the expected one, before touching the model.
        """
        ...


_codecs: list[Codec] = []
_codecs_lock = threading.Lock()


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available for saving its ``config_types`` and loading its ``peft_types``.

    A codec registered later wins over an earlier one for the same type.
    """
    if not isinstance(codec, Codec):
        raise TypeError(f"{type(codec).__name__} does not implement the Codec protocol")
    with _codecs_lock:
        _codecs.insert(0, codec)


def registered_codecs() -> list[Codec]:
    """The registered codecs, latest first (loads the built-in ones first)."""
    _load_builtin_codecs()
    with _codecs_lock:
        return list(_codecs)


def codec_for_config(config: object) -> Codec:
    """The codec saving handles built from ``config`` (matched by ``isinstance``).

    Raises:
        TypeError: no codec handles this config type.
    """
    codecs = registered_codecs()
    for codec in codecs:
        if isinstance(config, codec.config_types):
            return codec
    accepted = ", ".join(sorted({t.__name__ for codec in codecs for t in codec.config_types}))
    raise TypeError(f"cannot save or load a {type(config).__name__}; supported configs: {accepted}")


def codec_for_peft_type(peft_type: str) -> Codec:
    """The codec reading checkpoints whose adapter_config.json says ``peft_type``.

    Raises:
        ValueError: no codec reads this peft_type (the message lists the supported ones).
    """
    codecs = registered_codecs()
    for codec in codecs:
        if peft_type in codec.peft_types:
            return codec
    accepted = ", ".join(repr(t) for t in sorted({t for codec in codecs for t in codec.peft_types}))
    raise ValueError(f"peft_type={peft_type!r} is not supported; supported: {accepted}")


_builtin_loaded = False


def _load_builtin_codecs() -> None:
    """Import prefix_hooks.checkpoint.codecs (each module there registers its codec on import)."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from prefix_hooks.checkpoint import codecs  # noqa: F401  (registers on import)
