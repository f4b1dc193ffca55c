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
from transformers.pytorch_utils import Conv1D

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.state_dicts import check_state_dict, cpu_copies, loading_config
from prefix_hooks.core import swaps
from prefix_hooks.core.legacy_names import current_keys
from prefix_hooks.ia3.attachment import IA3Attachment
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.ia3.targets import select_targets


class IA3Codec:
    """Saves an :class:`IA3Attachment` in PEFT's layout and builds one back from it."""

    config_types: tuple[type, ...] = (IA3Config,)
    peft_types: tuple[str, ...] = ("IA3",)

    def save(self, handle: Any) -> SavedAdapter:
        """The adapter's config and tensors (CPU copies: later training does not change them).

        ``fan_in_fan_out`` is written True when a target is a transformers ``Conv1D``, as PEFT
        writes it (PEFT sets the flag for such targets; ours recognises ``Conv1D`` by type).

        Raises:
            TypeError: ``handle`` is not an :class:`IA3Attachment`.
        """
        if not isinstance(handle, IA3Attachment):
            raise TypeError(f"the (IA)^3 codec saves an IA3Attachment, got {type(handle).__name__}")
        tensors = handle.peft_state_dict()
        config = handle.config.to_json_dict()
        config["fan_in_fan_out"] = bool(config["fan_in_fan_out"]) or any(
            isinstance(target.module, Conv1D) for target in handle.targets
        )
        config.update(_targets_by_current_names(handle))
        return SavedAdapter(
            config=config,
            tensors=cpu_copies(tensors),
            extra={},
        )

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
        if not isinstance(config, IA3Config):
            raise TypeError(f"the (IA)^3 codec loads an IA3Config, got {type(config).__name__}")
        if saved.extra:
            raise ValueError(
                f"an (IA)^3 checkpoint has no extra tensors, but the extra file holds {sorted(saved.extra)[:8]}"
            )
        config = loading_config(config, trainable)
        handle = IA3Attachment(model, config, adapter_name)
        expected = handle.peft_state_dict()
        # keys written for module names from before transformers 5 (PEFT adapters trained on 4.x)
        given = current_keys(model, saved.tensors, expected)
        check_state_dict(given, expected, f"(IA)^3 adapter {adapter_name!r}")
        handle.load_peft_state_dict(given)
        return handle


def _targets_by_current_names(handle: IA3Attachment) -> dict[str, Any]:
    """Full target and feed-forward names when the config selects some target only by a name
    from before transformers 5 (PEFT matches current names only), else ``{}``."""
    selected = [(target.name, target.feedforward) for target in handle.targets]
    try:
        view = swaps.clean_view(handle.model)
        plain: list[tuple[str, bool]] | None = [
            (target.name, target.feedforward) for target in select_targets(view, handle.config, legacy_names=False)
        ]
    except ValueError:  # nothing matches without the old names
        plain = None
    if plain == selected:
        return {}
    return {
        "target_modules": sorted(name for name, _ in selected),
        "feedforward_modules": sorted(name for name, feedforward in selected if feedforward),
    }


CODEC = IA3Codec()
register_codec(CODEC)
