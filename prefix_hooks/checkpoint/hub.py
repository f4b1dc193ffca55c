"""Resolve an adapter location: a local folder, or a Hugging Face Hub repository fetched once.

A name that is an existing local folder is used as it is. Anything else is taken as a hub
repository id and fetched with ``huggingface_hub.snapshot_download`` (only the adapter files,
into the usual hub cache). Offline mode (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``,
read at call time) uses the cache alone and never opens a connection.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefix_hooks.checkpoint.folder import CheckpointError

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """Whether hub downloads are disabled (the environment now, or huggingface_hub's setting)."""
    from huggingface_hub import constants

    from_env = any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return from_env or bool(constants.HF_HUB_OFFLINE)


def resolve_folder(
    name_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    what: str = "an adapter",
) -> Path:
    """The local folder holding ``name_or_path`` (``/subfolder``), downloading it from the hub if needed.

    Args:
        name_or_path: a local folder, or a hub repository id (``"user/adapter"``).
        subfolder: a folder inside it.
        revision: hub branch, tag or commit (ignored for local folders).
        allow_pickle: also fetch ``*.bin`` files from the hub.
        what: what is looked for, for error messages.

    Raises:
        TypeError: ``name_or_path`` is not a str or os.PathLike.
        FileNotFoundError: not a local folder, and not on the hub (or offline and not cached).
        NotADirectoryError: a local file was given.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a folder path or hub repository id (str or os.PathLike), got {name_or_path!r}")
    if subfolder is not None and (not isinstance(subfolder, str) or Path(subfolder).is_absolute()):
        raise ValueError(f"subfolder={subfolder!r} is not accepted; expected a relative folder name or None")
    local = Path(os.fspath(name_or_path)).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"{str(local)!r} is a file; expected the folder holding {what}")
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"{str(folder)!r} does not exist (subfolder={subfolder!r} of {str(local)!r})")
        return folder
    return _download(
        os.fspath(name_or_path), subfolder=subfolder, revision=revision, allow_pickle=allow_pickle, what=what
    )


def _download(repo_id: str, *, subfolder: str | None, revision: str | None, allow_pickle: bool, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, nor a valid Hugging Face Hub repository id; expected the folder "
            f"holding {what}"
        ) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}*.json", f"{prefix}*.safetensors"] + ([f"{prefix}*.bin"] if allow_pickle else [])
    offline = offline_mode()
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise FileNotFoundError(
                f"{repo_id!r} is not a local folder, and hub downloads are disabled (HF_HUB_OFFLINE / "
                f"TRANSFORMERS_OFFLINE is set) with no cached copy; pass a local folder, or unset offline mode"
            ) from None
        raise FileNotFoundError(f"{repo_id!r} is not a local folder and could not be fetched from the hub") from None
    except OSError as error:  # network and HTTP errors (repository not found, gated, ...)
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched from the hub ({type(error).__name__}: {error})"
        ) from None
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not folder.is_dir():
        raise CheckpointError(f"the hub repository {repo_id!r} has no subfolder {subfolder!r}")
    return folder
