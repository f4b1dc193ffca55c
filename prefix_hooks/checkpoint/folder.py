"""Adapter folders on disk: atomic writes and validated reads.

Writing: the folder is built complete in a temporary folder next to the target (every file
written, flushed and fsync'd), then renamed into place, so a crash mid-save leaves either the
old folder or the new one, never a half-written folder that loads. A target that already
exists is replaced the same way when it holds only adapter files; a target holding anything
else (a Trainer ``checkpoint-N`` folder) keeps its other files: our config is removed first,
the weight files are replaced one by one (each atomically), and the config is written last,
so the folder does not load as an adapter until every file is complete.

Reading: safetensors only unless ``allow_pickle=True`` (then ``torch.load(weights_only=True)``);
truncated or corrupted files raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from prefix_hooks.checkpoint.codec import (
    CONFIG_NAME,
    EXTRA_CONFIG_KEY,
    EXTRA_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    SavedAdapter,
)

INDEX_NAME = "prefix_hooks_adapters.json"
"""Index of a folder holding several adapters in subfolders (see :func:`write_adapters`)."""

ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, EXTRA_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, INDEX_NAME})


class CheckpointError(ValueError):
    """An adapter folder is missing a file, holds a corrupted one, or would need unsafe loading."""


# --- writing -----------------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, fsync'd, then renamed into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist a rename inside ``directory`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _config_bytes(config: Mapping[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
    return save_safetensors({key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()})


def _adapter_files(saved: SavedAdapter) -> dict[str, bytes]:
    """File name -> content of one adapter.

    The config records, under ``"prefix_hooks"``, whether the extra file exists and the SHA-256
    of each weight file, so a file damaged after saving is detected even where safetensors'
    own checks (header, sizes) pass.
    """
    files = {WEIGHTS_NAME: _tensor_bytes(saved.tensors)}
    if saved.extra:
        files[EXTRA_WEIGHTS_NAME] = _tensor_bytes(saved.extra)
    config = dict(saved.config)
    section = dict(config.get(EXTRA_CONFIG_KEY, {}))
    section["extra_file"] = bool(saved.extra)
    section["sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    config[EXTRA_CONFIG_KEY] = section
    files[CONFIG_NAME] = _config_bytes(config)  # last: the folder loads only once it is written
    return files


def write_config(directory: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """Write ``adapter_config.json`` into ``directory`` (created if needed), atomically."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} is a file; expected a folder to write {CONFIG_NAME} into")
    target.mkdir(parents=True, exist_ok=True)
    _write_file(target / CONFIG_NAME, _config_bytes(config))


def write_adapters(directory: str | os.PathLike[str], adapters: Mapping[str, SavedAdapter]) -> None:
    """Write adapters into ``directory`` atomically.

    Args:
        directory: the target folder.
        adapters: relative subfolder -> adapter; ``""`` is the folder itself. With subfolders,
            an index (``prefix_hooks_adapters.json``) lists them in order, and each subfolder's
            config records the adapter name under ``"prefix_hooks"``.

    Raises:
        NotADirectoryError: ``directory`` is a file.
    """
    files: dict[str, bytes] = {}
    for subfolder, saved in adapters.items():
        for name, data in _adapter_files(saved).items():
            files[f"{subfolder}/{name}" if subfolder else name] = data
    if any(subfolder for subfolder in adapters):
        index = {"format_version": 1, "adapters": list(adapters)}
        files[INDEX_NAME] = _config_bytes(index)
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} is a file; expected a folder to save the adapter into")
    if target.is_dir() and not _holds_only_adapters(target):
        _write_into(target, files, list(adapters))
    else:
        _write_replacing(target, files)


def _holds_only_adapters(folder: Path) -> bool:
    """True when every entry of ``folder`` is an adapter file or a folder of them (safe to replace)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if not _holds_only_adapters(entry):
                return False
        elif entry.name not in ADAPTER_FILES:
            return False
    return True


def _write_replacing(target: Path, files: Mapping[str, bytes]) -> None:
    """Build the folder next to ``target`` and rename it into place (replacing an adapter-only folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    staging = target.with_name(f".{target.name}.{token}.tmp")
    staging.mkdir()
    try:
        for relative, data in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_directory(path.parent)
        if target.exists():
            retired = target.with_name(f".{target.name}.{token}.old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(target.parent)


def _write_into(target: Path, files: Mapping[str, bytes], subfolders: list[str]) -> None:
    """Write adapter files into a folder holding other files: configs removed first, written last."""
    for subfolder in subfolders:
        (target / subfolder / CONFIG_NAME).unlink(missing_ok=True)
    (target / INDEX_NAME).unlink(missing_ok=True)
    last = [relative for relative in files if Path(relative).name in (CONFIG_NAME, INDEX_NAME)]
    for relative in [r for r in files if r not in last] + last:
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if Path(relative).name == WEIGHTS_NAME:
            path.with_name(PICKLE_WEIGHTS_NAME).unlink(missing_ok=True)  # never leave a stale .bin beside
        if Path(relative).name == CONFIG_NAME and EXTRA_WEIGHTS_NAME not in {
            Path(r).name for r in files if Path(r).parent == Path(relative).parent
        }:
            path.with_name(EXTRA_WEIGHTS_NAME).unlink(missing_ok=True)
        _write_file(path, files[relative])


# --- reading -----------------------------------------------------------------------------


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``directory``.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` there.
        CheckpointError: the file is not valid JSON or not a JSON object.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; an adapter folder holds {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error}); the file is corrupted") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(config).__name__}; expected an object")
    return config


def read_index(directory: str | os.PathLike[str]) -> list[str] | None:
    """The subfolders listed by a multi-adapter folder's index, or ``None`` without an index."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error}); the file is corrupted") from None
    adapters = index.get("adapters") if isinstance(index, dict) else None
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) and a for a in adapters):
        raise CheckpointError(f"{str(path)!r} must hold {{'adapters': [subfolder, ...]}}, got {index!r}")
    for subfolder in adapters:
        if Path(subfolder).is_absolute() or ".." in Path(subfolder).parts:
            raise CheckpointError(f"{str(path)!r} lists {subfolder!r}; expected a subfolder name inside the folder")
    return adapters


def read_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against its recorded SHA-256 when given.

    Raises:
        CheckpointError: the file is truncated, corrupted, not a safetensors file, or differs
            from the checksum recorded when it was saved.
    """
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(
            f"{str(path)!r} does not match the SHA-256 recorded in {CONFIG_NAME} when it was saved: the file is "
            "corrupted or was changed afterwards; save the adapter again"
        )
    try:
        return load_safetensors(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{str(path)!r} is not a valid safetensors file ({type(error).__name__}: {error}); it may be truncated "
            "or corrupted: save the adapter again"
        ) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling raises many error types
        raise CheckpointError(
            f"{str(path)!r} could not be loaded with torch.load(weights_only=True) ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{str(path)!r} does not hold a dict of tensors keyed by name")
    return state


def read_adapter(directory: str | os.PathLike[str], *, allow_pickle: bool = False) -> SavedAdapter:
    """Read one adapter folder: config, weights and (when recorded) our extra tensors.

    Args:
        directory: a local folder.
        allow_pickle: accept ``adapter_model.bin`` when there is no safetensors file, loaded with
            ``torch.load(weights_only=True)``. Off by default: pickles can run code when loaded.

    Raises:
        FileNotFoundError: the config or the weights are missing.
        CheckpointError: a corrupted file, a pickle without ``allow_pickle=True``, or a missing extra file.
    """
    folder = Path(directory)
    config = read_config(folder)
    raw_section = config.get(EXTRA_CONFIG_KEY)
    section: dict[str, Any] = raw_section if isinstance(raw_section, dict) else {}
    raw_checksums = section.get("sha256")
    checksums: dict[str, Any] = raw_checksums if isinstance(raw_checksums, dict) else {}
    weights = folder / WEIGHTS_NAME
    pickle_weights = folder / PICKLE_WEIGHTS_NAME
    if weights.is_file():
        tensors = read_tensors(weights, checksums.get(WEIGHTS_NAME))
    elif pickle_weights.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{str(folder)!r} holds only {PICKLE_WEIGHTS_NAME}, a pickle, which can run arbitrary code when "
                f"loaded; it is refused by default. If you trust its source, pass allow_pickle=True (it is then "
                f"loaded with torch.load(weights_only=True)), or convert it to {WEIGHTS_NAME}"
            )
        tensors = _read_pickle(pickle_weights)
    else:
        raise FileNotFoundError(f"{str(folder)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    extra: dict[str, torch.Tensor] = {}
    extra_path = folder / EXTRA_WEIGHTS_NAME
    if extra_path.is_file():
        extra = read_tensors(extra_path, checksums.get(EXTRA_WEIGHTS_NAME))
    elif section.get("extra_file") is True:
        raise CheckpointError(
            f"{str(folder)!r} lacks {EXTRA_WEIGHTS_NAME}, which its {CONFIG_NAME} says was saved; the folder is incomplete"
        )
    return SavedAdapter(config=config, tensors=tensors, extra=extra)
