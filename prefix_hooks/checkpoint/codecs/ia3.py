"""Checkpoint codec of (IA)^3: PEFT 0.21's ``adapter_model.safetensors`` layout.

Keys (the adapter name removed, as PEFT's ``get_peft_model_state_dict`` does)::

    base_model.model.<target>.ia3_l    (out, 1) for a regular target, (1, in) for a feed-forward one
    base_model.model.<module>.<key>    every ``state_dict()`` entry of a modules-to-save copy

These are :meth:`IA3Attachment.peft_state_dict`'s keys; the config and these tensors rebuild the
adapter exactly, so (IA)^3 writes nothing into the extra file.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.codecs._weight_adapters import Selection, check_loadable, peft_config
from prefix_hooks.checkpoint.state_dicts import check_state_dict, copy_into, cpu_copies, loading_config
from prefix_hooks.core import swaps
from prefix_hooks.core.legacy_names import current_keys
from prefix_hooks.ia3.attachment import IA3Attachment
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.ia3.targets import Target, select_targets


class IA3Codec:
    """Saves an :class:`IA3Attachment` in PEFT's layout and builds one back from it."""

    config_types: tuple[type, ...] = (IA3Config,)
    peft_types: tuple[str, ...] = ("IA3",)

    def save(self, handle: Any) -> SavedAdapter:
        """The adapter's config (as :func:`peft_config` writes it, feed-forward modules included)
        and vectors (CPU copies: later training does not change them).

        Raises:
            TypeError: ``handle`` is not an :class:`IA3Attachment`.
        """
        if not isinstance(handle, IA3Attachment):
            raise TypeError(f"the (IA)^3 codec saves an IA3Attachment, got {type(handle).__name__}")
        view = swaps.clean_view(handle.model)

        def select(legacy_names: bool) -> Selection:
            return _selection(select_targets(view, handle.config, legacy_names=legacy_names))

        targets = [target.module for target in handle.targets]
        config = peft_config(handle.config, targets, _selection(handle.targets), select)
        return SavedAdapter(config=config, tensors=cpu_copies(handle.peft_state_dict()))

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> IA3Attachment:
        """An (IA)^3 adapter for ``model`` holding the saved vectors; validated, not attached.

        The targets are selected from ``config`` on ``model``; every saved key and shape is
        checked against them before the values are copied into the new adapter's tensors.
        The adapter is built with ``inference_mode=not trainable`` (PEFT's ``is_trainable``), so
        its vectors and copies have ``requires_grad=trainable``.

        Raises:
            TypeError: ``config`` is not an :class:`IA3Config`.
            ValueError: no target matches, a key is missing or unexpected, a shape or dtype is
                wrong, or extra tensors are present; ``model`` is untouched.
        """
        check_loadable(config, IA3Config, saved, "(IA)^3")
        handle = IA3Attachment(model, loading_config(config, trainable), adapter_name)
        expected = handle.peft_state_dict()
        # keys written for module names from before transformers 5 (PEFT adapters trained on 4.x)
        given = current_keys(model, saved.tensors, expected)
        check_state_dict(given, expected, f"(IA)^3 adapter {adapter_name!r}")
        copy_into(given, expected)  # the live vectors and copies
        return handle


def _selection(targets: list[Target]) -> Selection:
    """The target and feed-forward modules of ``targets``, by config field."""
    return {
        "target_modules": [target.name for target in targets],
        "feedforward_modules": [target.name for target in targets if target.feedforward],
    }


CODEC = IA3Codec()
register_codec(CODEC)
