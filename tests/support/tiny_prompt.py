"""Tiny, seeded models of every text family prompt tuning serves, built with the other tiny
modules' builders (no hub).

Exports the coverage interface (``FAMILIES``, ``build``, ``example_inputs``) plus
``GENERATING`` (families whose ``generate()`` is tested), ``UNSUPPORTED`` (families without
token inputs, which must be refused) and ``random_prompt`` (a prompt that matters).
"""

from __future__ import annotations

import tiny_encoders
import tiny_inline
import tiny_models
import tiny_seq2seq
import torch
from transformers import PreTrainedModel

from prefix_hooks.check.adapters import normal_weights
from prefix_hooks.prompt import PromptAttachment

SEQ2SEQ = ("t5", "bart", "mbart")
DECODERS = (*tiny_models.FAMILIES, *tiny_inline.FAMILIES)
ENCODERS = tiny_encoders.TEXT_FAMILIES
GENERATING = (*DECODERS, *SEQ2SEQ)
UNSUPPORTED = ("vit", "deit", "dinov2", "whisper", "llava")

FAMILIES: dict[str, tuple[str, ...]] = {
    **{family: tiny_models.implementations(family) for family in tiny_models.FAMILIES},
    **tiny_inline.FAMILIES,
    **{family: tiny_encoders.FAMILIES[family] for family in ENCODERS},
    **{family: tiny_seq2seq.FAMILIES[family] for family in SEQ2SEQ},
}
"""model_type -> attention implementations its tiny model builds with on CPU."""


def build(model_type: str, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """The family's usual task model (causal LM, sequence classification, seq2seq LM, or a refused
    vision/audio/multimodal model), eval mode, float32."""
    if model_type in tiny_models.FAMILIES:
        return tiny_models.build_model(model_type, attn_implementation, seed)
    if model_type in tiny_inline.FAMILIES:
        return tiny_inline.build(model_type, attn_implementation, seed)
    if model_type in (*SEQ2SEQ, "whisper"):
        return tiny_seq2seq.build(model_type, attn_implementation, seed)
    return tiny_encoders.build(model_type, attn_implementation, seed)


def example_inputs(model_type: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for :func:`build` (token ids and a 2-D mask for every supported family)."""
    if model_type in tiny_models.FAMILIES:
        return tiny_models.random_batch(batch, 5, seed)
    if model_type in tiny_inline.FAMILIES:
        return tiny_inline.example_inputs(model_type, batch, seed)
    if model_type in (*SEQ2SEQ, "whisper"):
        return tiny_seq2seq.example_inputs(model_type, batch, seed)
    return tiny_encoders.example_inputs(model_type, batch, seed)


def randomise_prompt(handle: PromptAttachment, seed: int = 2, scale: float = 1.0) -> PromptAttachment:
    """Give the prompt module normal weights from ``seed`` (times ``scale``), so the prompt matters."""
    normal_weights(handle.prompt_encoder, torch.Generator().manual_seed(seed), scale)
    return handle
