"""Tiny, seeded encoder-decoder models (t5, bart, mbart, whisper), built from the self-check's configs
(:mod:`prefix_hooks.check.tiny_models`; no hub)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq, PreTrainedModel

from prefix_hooks.check.adapters import normal_weights
from prefix_hooks.check.tiny_models import (
    AUDIO_FRAMES,
    DECODER_LEN,
    DECODER_START,
    LEFT_PADDED_ENCODERS,
    MEL_BINS,
    SEQ2SEQ,
    SEQ_LEN,
    VOCAB,
    WHISPER,
)

ENCODER_LEN = SEQ_LEN
CONFIGS: dict[str, dict[str, Any]] = {**SEQ2SEQ, "whisper": WHISPER}

DEEP_DECODER: dict[str, dict[str, Any]] = {  # overrides giving a decoder deeper than the encoder
    "t5": {"num_decoder_layers": 3},
    "bart": {"decoder_layers": 3},
    "mbart": {"decoder_layers": 3},
    "whisper": {"decoder_layers": 3},
}

FAMILIES: dict[str, tuple[str, ...]] = {model_type: ("eager", "sdpa") for model_type in CONFIGS}

LEFT_PADDED = LEFT_PADDED_ENCODERS  # t5 (relative positions); whisper's encoder takes no mask


def build(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A freshly initialised ``*ForConditionalGeneration`` of ``model_type``, eval mode, float32."""
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    auto = AutoModelForSpeechSeq2Seq if model_type == "whisper" else AutoModelForSeq2SeqLM
    return auto.from_config(config, attn_implementation=attn_implementation).eval()


def encoder_inputs(model_type: str, batch: int = 2, seed: int = 0, pad: list[int] | None = None) -> dict[str, torch.Tensor]:
    """What the encoder takes: ``input_ids`` + ``attention_mask`` ``(B, 7)`` with ``pad[i]``
    padding tokens in row ``i`` (left for t5, right for bart/mbart), or whisper's
    ``input_features`` ``(B, 8, 16)``."""
    generator = torch.Generator().manual_seed(seed)
    if model_type == "whisper":
        return {"input_features": torch.randn(batch, MEL_BINS, 2 * AUDIO_FRAMES, generator=generator)}
    input_ids = torch.randint(3, VOCAB, (batch, ENCODER_LEN), generator=generator)
    attention_mask = torch.ones(batch, ENCODER_LEN, dtype=torch.long)
    for row, count in enumerate(pad or []):
        if count:
            padding = slice(0, count) if model_type in LEFT_PADDED else slice(ENCODER_LEN - count, ENCODER_LEN)
            attention_mask[row, padding] = 0
            input_ids[row, padding] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def decoder_input_ids(batch: int = 2, length: int = DECODER_LEN, seed: int = 0) -> torch.Tensor:
    """``(B, length)`` decoder tokens starting with ``decoder_start_token_id``."""
    generator = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    ids[:, 0] = DECODER_START
    return ids


def example_inputs(model_type: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder inputs plus ``decoder_input_ids`` for one teacher-forced forward."""
    return {**encoder_inputs(model_type, batch, seed), "decoder_input_ids": decoder_input_ids(batch, seed=seed)}


def randomise(encoder: torch.nn.Module, seed: int = 2) -> None:
    """Give a prefix encoder non-trivial weights (normal, fixed seed) so the prefix matters."""
    normal_weights(encoder, torch.Generator().manual_seed(seed))


def depths(model: PreTrainedModel) -> tuple[int, int]:
    """``(encoder layers E, decoder layers D)`` as the config states them."""
    config: Any = model.config
    if config.model_type == "t5":
        return config.num_layers, config.num_decoder_layers
    return config.encoder_layers, config.decoder_layers
