"""Checkpoint codec of AdaLoRA: PEFT 0.21's ``adapter_model.safetensors`` layout.

Keys (the adapter name removed, as PEFT's ``get_peft_model_state_dict`` does; no ``.weight``, the
factors are parameters)::

    base_model.model.<target>.lora_A     (r', in)
    base_model.model.<target>.lora_B     (out, r')
    base_model.model.<target>.lora_E     (r', 1)
    base_model.model.<module>.<key>      modules-to-save copies and trained biases, as LoRA's codec

``ranknum`` is not saved (it is ``init_r``, from the config). Before any allocation ``r' = init_r``
and ``rank_pattern`` is null. After one, ``adapter_config.json`` holds ``rank_pattern``:
``"<target>.lora_E" -> [kept, ...]`` (``init_r`` flags), and each target's tensors hold only its
kept triplets, ``r'`` of them; loading builds ``init_r`` factors and keeps the flagged rows
(:meth:`~prefix_hooks.lora.adalora.attachment.AdaLoraAttachment.prune_to_rank_pattern`), exactly as
PEFT saves and loads. The config and these tensors rebuild the adapter, so nothing goes into the
extra file; a loaded adapter resumes training with ``trainable=True`` (the importance scores start
afresh, as in PEFT, which does not save them either).

This module registers after LoRA's codec (it imports it first): an ``AdaLoraConfig`` is a
``LoraConfig``, and the codec registered last is asked first.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.codecs._weight_adapters import check_loadable
from prefix_hooks.checkpoint.codecs.lora import CODEC as LORA_CODEC
from prefix_hooks.checkpoint.codecs.lora import PEFT_PREFIX, load_tensors
from prefix_hooks.checkpoint.state_dicts import loading_config
from prefix_hooks.lora.adalora.attachment import AdaLoraAttachment
from prefix_hooks.lora.adalora.config import AdaLoraConfig

FACTORS = ("lora_A", "lora_E", "lora_B")
"""The saved factors of a target; the triplets are rows of A and E, columns of B."""


def _kept_factors(handle: AdaLoraAttachment, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (LoRA's saved form of ``handle``) with each target's factors cut to its kept triplets."""
    pattern = handle.saved_rank_pattern()
    if pattern is None:
        return tensors
    out = dict(tensors)
    for target in handle.target_names:
        flags = pattern.get(f"{target}.lora_E")
        if flags is None:
            continue
        rows = [row for row, original in enumerate(handle.kept_rows(target)) if flags[original]]
        for factor in FACTORS:
            key = f"{PEFT_PREFIX}{target}.{factor}"
            values = tensors[key]
            out[key] = values[:, rows] if factor == "lora_B" else values[rows]  # B: (out, r'); A, E: (r', .)
    return out


class AdaLoraCodec:
    """Saves an :class:`AdaLoraAttachment` in PEFT's layout and builds one back from it."""

    config_types: tuple[type, ...] = (AdaLoraConfig,)
    peft_types: tuple[str, ...] = ("ADALORA",)

    def save(self, handle: Any) -> SavedAdapter:
        """LoRA's saved form of the adapter (PEFT's target rules, modules to save, biases), with the
        current rank pattern in the config and the factors cut to the kept triplets.

        Raises:
            TypeError: ``handle`` is not an :class:`AdaLoraAttachment`.
        """
        if not isinstance(handle, AdaLoraAttachment):
            raise TypeError(f"the AdaLoRA codec saves an AdaLoraAttachment, got {type(handle).__name__}")
        saved = LORA_CODEC.save(handle)
        saved.config["rank_pattern"] = handle.saved_rank_pattern()
        return SavedAdapter(config=saved.config, tensors=_kept_factors(handle, saved.tensors))

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> AdaLoraAttachment:
        """An AdaLoRA adapter for ``model`` holding the saved values; validated, not attached.

        The adapter is built from ``config`` (``inference_mode=not trainable``), pruned to its
        ``rank_pattern``, and every saved key and shape is checked before the values are copied in.
        Base-model tensors PEFT saves (trained biases) must equal the model's own.

        Raises:
            TypeError: ``config`` is not an :class:`AdaLoraConfig`.
            ValueError: no target matches, a ``rank_pattern`` key names no target, a key is missing or
                unexpected, a shape is wrong, or a base tensor differs from the model's; ``model`` is untouched.
        """
        check_loadable(config, AdaLoraConfig, saved, "AdaLoRA")
        handle = AdaLoraAttachment(model, cast(AdaLoraConfig, loading_config(config, trainable)), adapter_name)
        handle.prune_to_rank_pattern()
        load_tensors(handle, saved, f"AdaLoRA adapter {adapter_name!r}")
        return handle


CODEC = AdaLoraCodec()
register_codec(CODEC)
