"""Adapter checkpoints in PEFT's folder layout: save handles, load ours and PEFT's.

>>> handle.save("out/adapter")                          # or save_adapter(handle, "out/adapter")
>>> handle = load_adapter(model, "out/adapter")         # or attach(model, "out/adapter")

Each method has a :class:`Codec` (``prefix_hooks.checkpoint.codecs``) mapping its handle to
PEFT's ``adapter_model.safetensors`` keys; :mod:`.folder` writes atomically and reads with
validation (safetensors only unless ``allow_pickle=True``); :mod:`.hub` fetches hub ids.
"""

from prefix_hooks.checkpoint.api import SaveAdapterCallback, load_adapter, save_adapter
from prefix_hooks.checkpoint.codec import (
    EXTRA_CONFIG_KEY,
    Codec,
    SavedAdapter,
    codec_for_config,
    codec_for_peft_type,
    register_codec,
)
from prefix_hooks.checkpoint.configs import config_from_dict
from prefix_hooks.checkpoint.folder import CheckpointError
from prefix_hooks.checkpoint.peft_format import PeftFolderFormat
from prefix_hooks.core.checkpoints import register_checkpoint_format

__all__ = [
    "EXTRA_CONFIG_KEY",
    "CheckpointError",
    "Codec",
    "SaveAdapterCallback",
    "SavedAdapter",
    "codec_for_config",
    "codec_for_peft_type",
    "config_from_dict",
    "load_adapter",
    "register_codec",
    "save_adapter",
]

register_checkpoint_format(PeftFolderFormat())  # the core reaches folders through this (prefix_hooks.core.checkpoints)
