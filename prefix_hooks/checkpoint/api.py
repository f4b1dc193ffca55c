"""Saving handles to adapter folders and loading them back.

>>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=8)) as handle:
...     train(model)
...     handle.save("my-prefix")                  # PEFT's layout: PeftModel.from_pretrained reads it
>>> with attach_prefix(model, "my-prefix"):         # or attach(model, "my-prefix"), load_adapter(...)
...     generate(model)

Several adapters (a :class:`~prefix_hooks.MultiAttachment`) save one subfolder each, named by
the part's ``adapter_name`` when the names differ, otherwise by method (``prefix_tuning``,
``lora``, ``prompt_tuning``, ``p_tuning``, ``ia3``); ``prefix_hooks_adapters.json`` lists them in
attach order. Each subfolder is a PEFT adapter folder of its own
(``PeftModel.from_pretrained(model, folder, subfolder="lora")``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prefix_hooks.checkpoint.codec import (
    CONFIG_NAME,
    EXTRA_CONFIG_KEY,
    SavedAdapter,
    codec_for_config,
    codec_for_peft_type,
)
from prefix_hooks.checkpoint.configs import parse_config, warn_unknown_keys
from prefix_hooks.checkpoint.folder import INDEX_NAME, read_adapter, read_index, write_adapters
from prefix_hooks.checkpoint.hub import resolve_folder
from prefix_hooks.core.attachment import Attachment
from prefix_hooks.core.compose import MultiAttachment
from prefix_hooks.core.config import PeftType

A = TypeVar("A", bound=Attachment)

PathLike = str | os.PathLike[str]


def _leaves(handle: Attachment) -> Iterator[Attachment]:
    if isinstance(handle, MultiAttachment):
        for part in handle.parts:
            yield from _leaves(part)
    else:
        yield handle


def _config_of(handle: Attachment) -> Any:
    config = getattr(handle, "config", None)
    if config is None:
        raise TypeError(f"{type(handle).__name__} has no config; only adapters built from a config can be saved")
    return config


def _model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of ``model`` (``"llama"``), or None for other modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def check_model_type(config: dict[str, Any], model: nn.Module, folder: Path) -> None:
    """Refuse an adapter saved (by us) for another architecture, even where every shape would fit.

    PEFT's folders do not record the architecture; they are checked by keys and shapes only.

    Raises:
        ValueError: the recorded ``model_type`` differs from ``model``'s.
    """
    section = config.get(EXTRA_CONFIG_KEY)
    saved_type = section.get("model_type") if isinstance(section, dict) else None
    model_type = _model_type(model)
    if isinstance(saved_type, str) and model_type is not None and saved_type != model_type:
        raise ValueError(
            f"{str(folder)!r} was saved for a {saved_type!r} model; this is a {model_type!r} model "
            f"({type(model).__name__}): an adapter does not transfer between architectures"
        )


def _saved(handle: Attachment) -> SavedAdapter:
    """The codec's saved form of one (non-composite) handle, its adapter name recorded."""
    saved = codec_for_config(_config_of(handle)).save(handle)
    section = dict(saved.config.get(EXTRA_CONFIG_KEY, {}))
    section["adapter_name"] = handle.adapter_name
    model_type = _model_type(handle.model)
    if model_type is not None:
        section["model_type"] = model_type
    return SavedAdapter(config={**saved.config, EXTRA_CONFIG_KEY: section}, tensors=saved.tensors, extra=saved.extra)


def save_adapter(handle: Attachment, save_directory: PathLike) -> None:
    """Save ``handle`` (attached or not) into ``save_directory`` in PEFT's folder layout, atomically.

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and, when the method has
    values PEFT has no place for, ``prefix_hooks_extra.safetensors``. A
    :class:`~prefix_hooks.MultiAttachment` saves one subfolder per part (see the module doc).
    An existing folder holding only adapter files is replaced; inside a folder holding other
    files (a Trainer checkpoint) the adapter files are written beside them.

    Raises:
        TypeError: ``save_directory`` is not a path, or the handle's method cannot be saved.
        ValueError: two parts of a MultiAttachment would share a subfolder.
    """
    if not isinstance(handle, Attachment):
        raise TypeError(f"expected an Attachment to save, got {type(handle).__name__}")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory={save_directory!r} is not accepted; expected a str or os.PathLike")
    leaves = list(_leaves(handle))
    if not isinstance(handle, MultiAttachment):
        write_adapters(save_directory, {"": _saved(handle)})
        return
    names = [leaf.adapter_name for leaf in leaves]
    if len(set(names)) != len(names):
        names = [PeftType(_config_of(leaf).peft_type).value.lower() for leaf in leaves]
    if len(set(names)) != len(names):
        raise ValueError(
            f"cannot save parts {[leaf.adapter_name for leaf in leaves]} into subfolders: two parts of the same "
            "method share a name; give them different adapter_name values"
        )
    write_adapters(save_directory, {name: _saved(leaf) for name, leaf in zip(names, leaves, strict=True)})


def _load_one(
    model: nn.Module, folder: Path, adapter_name: str, trainable: bool, allow_pickle: bool
) -> tuple[Attachment, Callable[[], None]]:
    """The handle of one adapter folder, and the warning about unknown config keys to give once all loaded."""
    saved = read_adapter(folder, allow_pickle=allow_pickle)
    config, unknown = parse_config(saved.config)
    check_model_type(saved.config, model, folder)
    codec = codec_for_peft_type(PeftType(config.peft_type).value)
    handle = codec.load(model, config, saved, adapter_name, trainable)
    if handle.model is not model or handle.is_attached:
        raise RuntimeError(f"{type(codec).__name__}.load must return a not attached handle on the given model")
    return handle, functools.partial(warn_unknown_keys, config, unknown)


def load_adapter(
    model: nn.Module,
    name_or_path: PathLike,
    adapter_name: str = "default",
    *,
    trainable: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
) -> Attachment:
    """Build a (not attached) handle on ``model`` from a saved adapter: ours or PEFT's.

    Every file, key and shape is checked against the model before the handle is returned; the
    model itself is never changed here (attach the handle to apply it).

    Args:
        model: the base model the adapter was trained on.
        name_or_path: a local folder, or a Hugging Face Hub repository id (fetched with
            ``huggingface_hub``; ``HF_HUB_OFFLINE=1`` uses the cache only).
        adapter_name: the handle's name. For a folder of several adapters, the name of the
            returned :class:`~prefix_hooks.MultiAttachment`; its parts keep their saved names.
        trainable: build the trainable form (for prompt learning, the unfolded encoder when the
            folder holds our extra file; PEFT's folders hold only the folded prompt); otherwise
            the frozen inference form, as PEFT's ``inference_mode``.
        allow_pickle: accept a folder whose weights are only ``adapter_model.bin`` (a pickle:
            it can run code when loaded; it is loaded with ``torch.load(weights_only=True)``).
        revision: hub revision (branch, tag or commit).
        subfolder: a folder inside ``name_or_path`` (PEFT's layout for a second adapter).

    Returns:
        The handle (a MultiAttachment for a folder of several adapters).

    Raises:
        FileNotFoundError: no such folder (or hub repository), or no adapter in it.
        CheckpointError (a ValueError): a corrupted file, or a pickle without ``allow_pickle``.
        ValueError: a config, key or shape that does not fit ``model`` (naming it).
    """
    if not isinstance(trainable, bool) or not isinstance(allow_pickle, bool):
        raise ValueError(f"trainable={trainable!r}, allow_pickle={allow_pickle!r}: expected True or False")
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ValueError(f"adapter_name={adapter_name!r} is not accepted; expected a Python identifier")
    folder = resolve_folder(name_or_path, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
    if (folder / CONFIG_NAME).is_file():
        handle, warn = _load_one(model, folder, adapter_name, trainable, allow_pickle)
        warn()  # only once the adapter has loaded: a failed load raises without warnings
        return handle
    subfolders = read_index(folder)
    if subfolders is None:
        hint = ""
        if (folder / "model.safetensors").is_file() or (folder / "trainer_state.json").is_file():
            hint = (
                " It looks like a Trainer checkpoint: pass callbacks=[SaveAdapterCallback(handle)] to the Trainer "
                "so that each checkpoint also holds the adapter."
            )
        raise FileNotFoundError(
            f"{str(folder)!r} holds no {CONFIG_NAME} (nor {INDEX_NAME}); it is not an adapter folder.{hint}"
        )
    loaded = [
        _load_one(model, folder / name, read_adapter_name(folder / name) or adapter_name, trainable, allow_pickle)
        for name in subfolders
    ]
    multi = MultiAttachment(model, [handle for handle, _ in loaded], adapter_name)
    for _, warn in loaded:
        warn()
    return multi


def read_adapter_name(folder: Path) -> str | None:
    """The adapter name recorded in a saved config (``config["prefix_hooks"]["adapter_name"]``), if any."""
    from prefix_hooks.checkpoint.folder import read_config

    section = read_config(folder).get(EXTRA_CONFIG_KEY)
    name = section.get("adapter_name") if isinstance(section, dict) else None
    return name if isinstance(name, str) and name.isidentifier() else None


def load_adapter_as(model: nn.Module, name_or_path: PathLike, expected: type[A], adapter_name: str = "default") -> A:
    """:func:`load_adapter` for ``attach_prefix(model, path)`` and friends: the handle must be an ``expected``.

    Raises:
        ValueError: the folder holds another method (the message names it and the function to use).
    """
    handle = load_adapter(model, name_or_path, adapter_name)
    if not isinstance(handle, expected):
        found = type(handle).__name__
        raise ValueError(
            f"{os.fspath(name_or_path)!r} holds a {found} adapter, not a {expected.__name__}; load it with "
            "prefix_hooks.attach(model, path) or load_adapter(model, path)"
        )
    return handle


class SaveAdapterCallback(TrainerCallback):
    """Write ``handle`` into every Trainer checkpoint folder, so ``load_adapter(model, "…/checkpoint-N")`` works.

    The Trainer saves the whole model (``model.safetensors``) but no adapter config; this
    callback adds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout)
    beside the Trainer's files at each save (main process only).

    Example:
        >>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=8)) as handle:
        ...     Trainer(model, args, callbacks=[SaveAdapterCallback(handle)], ...).train()
        >>> handle = load_adapter(model, "out/checkpoint-500", trainable=True)
    """

    def __init__(self, handle: Attachment, subfolder: str | None = None) -> None:
        if not isinstance(handle, Attachment):
            raise TypeError(f"SaveAdapterCallback needs an Attachment, got {type(handle).__name__}")
        self.handle = handle
        self.subfolder = subfolder

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if state.is_world_process_zero and args.output_dir is not None:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_adapter(self.handle, folder / self.subfolder if self.subfolder else folder)
        return control
