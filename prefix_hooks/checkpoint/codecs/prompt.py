"""Checkpoint codec of prompt tuning and P-tuning: PEFT 0.21's layout, plus P-tuning's head.

Files (``T = num_virtual_tokens * num_transformer_submodules`` virtual tokens of width ``token_dim``)::

    adapter_model.safetensors
        prompt_embeddings             (T, token_dim)  the prompt as inference uses it (P-tuning: the head's output)
        base_model.<module>.<key>     every state_dict() entry of a modules_to_save copy (PEFT's keys)
    prefix_hooks_extra.safetensors    P-tuning trained with its head only: the PromptEncoder's state_dict
        embedding.weight              (T, token_dim)
        mlp_head.* / lstm_head.*      the head (see prefix_hooks.prompt.modules.PromptEncoder)
    adapter_config.json               PEFT's keys; keep_virtual_outputs under config["prefix_hooks"]

Prompt tuning's ``prompt_embeddings`` is its whole trained state, so it has no extra file and
resumes from PEFT's folders too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.codecs.prefix import (
    PROMPT_KEY,
    check_folded_matches,
    peft_loadable_config,
    saved_module_tensors,
)
from prefix_hooks.checkpoint.state_dicts import check_state_dict, copy_into, cpu_copies
from prefix_hooks.prompt.attachment import PromptAttachment
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit
from prefix_hooks.prompt.modules import PromptEncoder, prompt_embeddings_to_save


def _meta_encoder(config: PromptEncoderConfig) -> PromptEncoder:
    """The trainable P-tuning encoder of ``config`` on the meta device: its state_dict gives the extra file's shapes."""
    with torch.device("meta"):
        return PromptEncoder(dataclasses.replace(config, inference_mode=False))


def _without_init(config: PromptTuningConfig) -> PromptTuningConfig:
    """``config`` with RANDOM initialisation: cheap, and no tokenizer to load."""
    return dataclasses.replace(
        config, prompt_tuning_init=PromptTuningInit.RANDOM, prompt_tuning_init_text=None, tokenizer_kwargs=None
    )


class PromptCodec:
    """Saves a :class:`PromptAttachment` (prompt tuning or P-tuning) in PEFT's layout and builds one back."""

    config_types: tuple[type, ...] = (PromptTuningConfig, PromptEncoderConfig)
    peft_types: tuple[str, ...] = ("PROMPT_TUNING", "P_TUNING")

    def save(self, handle: Any) -> SavedAdapter:
        """The prompt (PEFT's ``prompt_embeddings``), the modules_to_save copies and, for P-tuning
        with its head, the whole encoder in the extra file (CPU copies).

        The config says ``inference_mode: true``, as PEFT's ``save_pretrained`` writes it, and
        names the generative task type when it had none (``peft_loadable_config``).

        Raises:
            TypeError: ``handle`` is not a :class:`PromptAttachment`.
        """
        if not isinstance(handle, PromptAttachment):
            raise TypeError(f"the prompt codec saves a PromptAttachment, got {type(handle).__name__}")
        module = handle.prompt_encoder
        tensors = {PROMPT_KEY: prompt_embeddings_to_save(module), **saved_module_tensors(handle.saved_modules)}
        head = isinstance(module, PromptEncoder) and module.has_head
        extra = dict(module.state_dict(keep_vars=True)) if head else {}
        saved_config = peft_loadable_config(handle.config.to_json_dict(), handle.model)
        return SavedAdapter(config=saved_config, tensors=cpu_copies(tensors), extra=cpu_copies(extra))

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> PromptAttachment:
        """A prompt for ``model`` holding the saved values; validated, not attached.

        ``trainable=False`` builds the inference form: a frozen embedding holding
        ``prompt_embeddings`` (P-tuning without its head, as PEFT's inference mode).
        ``trainable=True`` builds the trained form: prompt tuning's embedding from
        ``prompt_embeddings``; P-tuning's embedding and head from the extra file (checked to
        reproduce ``prompt_embeddings``). Prompt tuning's initialisation (``TEXT`` loads a
        tokenizer) is not run: the saved values replace it.

        Raises:
            TypeError: ``config`` is not a prompt config.
            ValueError: the config does not fit ``model``; a key is missing or unexpected, a shape
                or dtype is wrong; P-tuning with ``trainable=True`` but no extra file (PEFT's folders
                hold only the encoder's output); ``model`` is untouched.
        """
        if not isinstance(config, (PromptTuningConfig, PromptEncoderConfig)):
            raise TypeError(
                f"the prompt codec loads a PromptTuningConfig or PromptEncoderConfig, got {type(config).__name__}"
            )
        method = "P-tuning" if isinstance(config, PromptEncoderConfig) else "prompt tuning"
        what = f"{method} adapter {adapter_name!r}"
        if saved.extra and isinstance(config, PromptTuningConfig):
            raise ValueError(
                f"a prompt-tuning checkpoint has no extra tensors, but the extra file holds {sorted(saved.extra)[:8]}"
            )
        if trainable and isinstance(config, PromptEncoderConfig) and not saved.extra:
            raise ValueError(
                f"cannot load {what} with trainable=True: the folder holds only the encoder's output (PEFT's format, "
                "which PEFT cannot resume either) and no prefix_hooks_extra.safetensors with the P-tuning head. Load "
                "it with trainable=False, or train the output as a prompt: attach_prompt(model, "
                "PromptTuningConfig(...)) and copy prompt_embeddings into handle.prompt_encoder.embedding.weight"
            )
        # modules_to_save stays as saved (PEFT's task heads included: they may match nothing), so it saves again unchanged
        loading: PromptTuningConfig | PromptEncoderConfig = dataclasses.replace(config, inference_mode=not trainable)
        if isinstance(loading, PromptTuningConfig):  # the saved values replace the init: skip it (no tokenizer)
            loading = _without_init(loading)
        handle = PromptAttachment(model, loading, adapter_name)  # validates the config against the model
        if isinstance(config, PromptTuningConfig) and isinstance(handle.config, PromptTuningConfig):
            # the handle reports (and saves again) the initialisation it was trained from
            handle.config = dataclasses.replace(
                handle.config,
                prompt_tuning_init=config.prompt_tuning_init,
                prompt_tuning_init_text=config.prompt_tuning_init_text,
                tokenizer_kwargs=config.tokenizer_kwargs,
            )
        module = handle.prompt_encoder
        expected = {PROMPT_KEY: module.embedding.weight, **saved_module_tensors(handle.saved_modules)}
        if isinstance(module, PromptEncoder) and module.has_head:
            expected[PROMPT_KEY] = torch.empty(module.total_virtual_tokens, module.token_dim, device="meta")
        check_state_dict(saved.tensors, expected, what)
        resolved = handle.config
        if saved.extra and isinstance(resolved, PromptEncoderConfig):
            check_state_dict(saved.extra, _meta_encoder(resolved).state_dict(), f"{what} (extra file)")
        if isinstance(module, PromptEncoder) and module.has_head:
            copy_into(saved.extra, dict(module.state_dict(keep_vars=True)))
            check_folded_matches(prompt_embeddings_to_save(module), saved.tensors[PROMPT_KEY], PROMPT_KEY, what)
        else:
            copy_into(saved.tensors, {PROMPT_KEY: module.embedding.weight})
        copy_into(saved.tensors, saved_module_tensors(handle.saved_modules))
        return handle


CODEC = PromptCodec()
register_codec(CODEC)
