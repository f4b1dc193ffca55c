"""Checkpoint codec of prefix tuning: PEFT 0.21's layout, plus what PEFT cannot resume from.

Files (``P`` virtual tokens, ``L`` prefix slots, ``token_dim = kv_heads * head_dim``)::

    adapter_model.safetensors
        prompt_embeddings             (P, L * 2 * token_dim)  the folded prefix, projection applied (PEFT's)
        base_model.<module>.<key>     every state_dict() entry of a modules_to_save copy (PEFT's keys)
    prefix_hooks_extra.safetensors    only for a trainable projection (prefix_projection=True)
        embedding.weight              (P, token_dim)
        transform.0.weight / .bias    (H, token_dim) / (H,)
        transform.2.weight / .bias    (L * 2 * token_dim, H) / (L * 2 * token_dim,)
    adapter_config.json               PEFT's keys; position_offset and encoder_decoder_layout under
                                      config["prefix_hooks"] (written by the config itself)

A folder saved by PEFT has no ``"prefix_hooks"`` section: its prefix uses PEFT's conventions,
``position_offset=None`` (real tokens at ``P..``) and, on an encoder-decoder, the ``"peft"``
layout (decoder self-attention only), so it reproduces PEFT's outputs.

Our ``"full"`` encoder-decoder layout (encoder, decoder and cross-attention prefixes) has no
PEFT equivalent: PEFT would read its slots as decoder self-attention prefixes and compute
something else without an error. Its folded prefix is therefore saved under
:data:`FULL_LAYOUT_KEY` instead of ``prompt_embeddings``, so ``PeftModel.from_pretrained``
refuses the folder (``KeyError: 'prompt_embeddings'``) while our loader reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.state_dicts import check_state_dict, copy_into, cpu_copies
from prefix_hooks.core.saved_modules import SavedModules
from prefix_hooks.prefix.attachment import PrefixAttachment
from prefix_hooks.prefix.config import EncoderDecoderLayout, PrefixTuningConfig
from prefix_hooks.prefix.encoder import PrefixEncoder

PROMPT_KEY = "prompt_embeddings"
"""PEFT's key of the folded prompt (prefix tuning, prompt tuning and P-tuning)."""

FULL_LAYOUT_KEY = "prefix_hooks.full_layout.prompt_embeddings"
"""Key of the folded prefix of the ``"full"`` encoder-decoder layout, which PEFT cannot compute."""

SAVED_MODULE_PREFIX = "base_model."
"""Prefix of PEFT's keys of modules_to_save copies for prompt-learning methods (their PEFT model
wraps the transformers model directly, without the ``.model`` of LoRA's)."""


def saved_module_tensors(saved_modules: SavedModules) -> dict[str, torch.Tensor]:
    """The modules_to_save copies under PEFT's prompt-learning keys: ``base_model.<module>.<key>``
    for every ``state_dict()`` entry of each copy (live tensors, detached, not copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, duplicate in zip(saved_modules.names, saved_modules.copies(), strict=True):
        for key, tensor in duplicate.state_dict(keep_vars=True).items():
            out[f"{SAVED_MODULE_PREFIX}{name}.{key}"] = tensor.detach()
    return out


def check_folded_matches(
    recomputed: torch.Tensor, saved: torch.Tensor, key: str, what: str, tolerance: float = 1e-3
) -> None:
    """Raise unless the prompt the extra file's trainable form computes is the saved folded one.

    Both files come from one save, so they agree up to round-off (a save on another device may
    use other kernels: hence the loose ``tolerance``, relative to the prompt's scale); files
    from different saves disagree by the size of the prompt itself.
    """
    reference = saved.to(recomputed.device, recomputed.dtype)
    difference = float((recomputed - reference).abs().max()) if reference.numel() else 0.0
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    if difference > tolerance * scale:
        raise ValueError(
            f"the extra file's trainable form of {what} computes a prompt that differs from the saved {key!r} by "
            f"{difference:.3g}; the two weight files come from different saves"
        )


def folded_prefix(encoder: PrefixEncoder) -> torch.Tensor:
    """The prefix as PEFT saves it, ``(P, L * 2 * token_dim)``, computed afresh (detached).

    Not :meth:`PrefixEncoder.folded_weight`: its cache is keyed on the parameters' version
    counters, which a fused optimizer step (``torch.optim.AdamW(fused=True)``, the Trainer's
    default ``adamw_torch_fused``) does not bump, so after training it may be stale.
    """
    with torch.no_grad():
        weight = encoder.embedding.weight  # (P, token_dim) or (P, L*2*token_dim)
        return (encoder.transform(weight) if encoder.prefix_projection else weight).detach()  # (P, L*2*token_dim)


def generative_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a generative ``model`` (``CAUSAL_LM`` / ``SEQ_2_SEQ_LM``), else ``None``.

    Written into a saved prompt-learning config that has none: PEFT loads a folder without a
    task type as a bare ``PeftModel``, whose forward never applies a prefix or prompt (silently
    the base model). The generative tasks imply no task head, so our own loader reads such a
    folder exactly as before; other tasks are left alone (their heads would be implied).
    """
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM" if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) else None
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def peft_loadable_config(saved_config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``saved_config`` as PEFT's ``save_pretrained`` writes it: ``inference_mode`` true, and a
    generative ``task_type`` filled in where the config has none (:func:`generative_task_type`)."""
    saved_config["inference_mode"] = True
    if saved_config.get("task_type") is None:
        saved_config["task_type"] = generative_task_type(model)
    return saved_config


def _meta_encoder(config: PrefixTuningConfig) -> PrefixEncoder:
    """The projection form of ``config`` on the meta device: its state_dict gives the extra file's shapes."""
    with torch.device("meta"):
        return PrefixEncoder(dataclasses.replace(config, inference_mode=False, prefix_projection=True))


class PrefixCodec:
    """Saves a :class:`PrefixAttachment` in PEFT's layout and builds one back from it."""

    config_types: tuple[type, ...] = (PrefixTuningConfig,)
    peft_types: tuple[str, ...] = ("PREFIX_TUNING",)

    def save(self, handle: Any) -> SavedAdapter:
        """The folded prefix (PEFT's ``prompt_embeddings``), the modules_to_save copies and, for a
        trainable projection, the unfolded encoder in the extra file (CPU copies).

        The config says ``inference_mode: true``, as PEFT's ``save_pretrained`` writes it, and
        names the generative task type when it had none (:func:`peft_loadable_config`).

        Raises:
            TypeError: ``handle`` is not a :class:`PrefixAttachment`.
        """
        if not isinstance(handle, PrefixAttachment):
            raise TypeError(f"the prefix-tuning codec saves a PrefixAttachment, got {type(handle).__name__}")
        config = handle.config
        key = FULL_LAYOUT_KEY if config.encoder_decoder_layout == EncoderDecoderLayout.FULL else PROMPT_KEY
        tensors = {key: folded_prefix(handle.encoder), **saved_module_tensors(handle.saved_modules)}
        extra = dict(handle.encoder.state_dict(keep_vars=True)) if handle.encoder.prefix_projection else {}
        saved_config = peft_loadable_config(config.to_json_dict(), handle.model)
        return SavedAdapter(config=saved_config, tensors=cpu_copies(tensors), extra=cpu_copies(extra))

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> PrefixAttachment:
        """A prefix for ``model`` holding the saved values; validated, not attached.

        ``trainable=False`` builds the folded form (a frozen ``Embedding(P, L * 2 * token_dim)``
        holding ``prompt_embeddings``), as PEFT's inference mode does. ``trainable=True`` builds
        the form that was trained: with ``prefix_projection`` the embedding and MLP from the
        extra file (checked to reproduce ``prompt_embeddings``), otherwise the plain embedding.
        A PEFT folder (no ``"prefix_hooks"`` section) loads with PEFT's conventions: on an
        encoder-decoder in the ``"peft"`` layout.

        Raises:
            TypeError: ``config`` is not a :class:`PrefixTuningConfig`.
            ValueError: the config does not fit ``model``; a key is missing or unexpected, a shape
                or dtype is wrong; ``trainable=True`` with a projection but no extra file (PEFT's
                folders hold only the folded prefix); ``model`` is untouched.
        """
        if not isinstance(config, PrefixTuningConfig):
            raise TypeError(f"the prefix-tuning codec loads a PrefixTuningConfig, got {type(config).__name__}")
        what = f"prefix adapter {adapter_name!r}"
        if saved.extra and not config.prefix_projection:
            raise ValueError(
                f"{what} has prefix_projection=False, so its checkpoint has no extra tensors, but the extra file holds "
                f"{sorted(saved.extra)[:8]}"
            )
        if trainable and config.prefix_projection and not saved.extra:
            raise ValueError(
                f"cannot load {what} with trainable=True: it was trained with prefix_projection=True and the folder "
                "holds only the folded prefix (PEFT's format, which PEFT cannot resume either) and no "
                "prefix_hooks_extra.safetensors with the projection MLP. Load it with trainable=False, or train the "
                "folded prefix: attach_prefix(model, PrefixTuningConfig(..., prefix_projection=False)) and copy "
                "prompt_embeddings into handle.encoder.embedding.weight"
            )
        layout = config.encoder_decoder_layout
        if layout is None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            layout = EncoderDecoderLayout.PEFT  # a PEFT folder: only PEFT's layout reproduces it
        # modules_to_save stays as saved (PEFT's task heads included: they may match nothing), so it saves again unchanged
        config = dataclasses.replace(config, encoder_decoder_layout=layout, inference_mode=not trainable)
        handle = PrefixAttachment(model, config, adapter_name)  # validates the config against the model
        resolved = handle.config
        key = FULL_LAYOUT_KEY if resolved.encoder_decoder_layout == EncoderDecoderLayout.FULL else PROMPT_KEY
        output_dim = handle.encoder.output_dim
        expected = {
            key: torch.empty(resolved.num_virtual_tokens, output_dim, device="meta"),
            **saved_module_tensors(handle.saved_modules),
        }
        check_state_dict(saved.tensors, expected, what)
        if saved.extra:
            check_state_dict(saved.extra, _meta_encoder(resolved).state_dict(), f"{what} (extra file)")
        encoder = handle.encoder
        trained_form = dict(encoder.state_dict(keep_vars=True)) if encoder.prefix_projection else {}
        copy_into(saved.extra, trained_form)
        if encoder.prefix_projection:
            check_folded_matches(folded_prefix(encoder), saved.tensors[key], key, what)
        else:
            copy_into(saved.tensors, {key: encoder.embedding.weight})
        copy_into(saved.tensors, saved_module_tensors(handle.saved_modules))
        return handle


CODEC = PrefixCodec()
register_codec(CODEC)
