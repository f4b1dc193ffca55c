"""Tiny, seeded encoder, vision and multimodal (llava) models, built from the self-check's configs
(:mod:`prefix_hooks.check.tiny_models`; no hub).

Exports the coverage interface: ``FAMILIES`` (model type -> attention implementations),
``build`` (the family's usual task model: sequence classification for text encoders,
image classification for vision encoders, conditional generation for llava) and
``example_inputs``; plus ``build_head`` for any task head and the batch helpers the
encoder tests use.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.check.adapters import normal_weights
from prefix_hooks.check.tiny_models import (
    ENCODERS,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGE_TOKENS,
    NUM_LABELS,
    SEQ_LEN,
    VISION,
    VOCAB,
    llava_config,
)

TEXT_CONFIGS: dict[str, dict[str, Any]] = ENCODERS
VISION_CONFIGS: dict[str, dict[str, Any]] = VISION
TEXT_FAMILIES = tuple(TEXT_CONFIGS)
VISION_FAMILIES = tuple(VISION_CONFIGS)
LLAVA = "llava"
FAMILIES: dict[str, tuple[str, ...]] = {
    family: ("eager", "sdpa") for family in (*TEXT_FAMILIES, *VISION_FAMILIES, LLAVA)
}

HEADS = {
    "sequence": AutoModelForSequenceClassification,
    "token": AutoModelForTokenClassification,
    "question_answering": AutoModelForQuestionAnswering,
    "features": AutoModel,
    "image": AutoModelForImageClassification,
}


def config_for(model_type: str, **overrides: Any) -> Any:
    """The tiny config of ``model_type`` (text or vision encoder, or llava)."""
    if model_type == LLAVA:
        return llava_config(**overrides)
    settings = TEXT_CONFIGS.get(model_type) or VISION_CONFIGS.get(model_type)
    if settings is None:
        raise ValueError(f"no tiny config for model_type={model_type!r}; have {', '.join(FAMILIES)}")
    return AutoConfig.for_model(model_type, **{**settings, "num_labels": NUM_LABELS, **overrides})


def build_head(
    model_type: str, head: str = "sequence", attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A freshly initialised ``model_type`` model with the task ``head`` (a key of ``HEADS``), eval, float32."""
    if head == "question_answering":
        overrides = {"num_labels": 2, **overrides}  # start and end logits
    config = config_for(model_type, **overrides)
    torch.manual_seed(seed)
    model = HEADS[head].from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def build(model_type: str, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """The family's usual task model: sequence / image classification, or llava's generator."""
    if model_type == LLAVA:
        torch.manual_seed(seed)
        llava = LlavaForConditionalGeneration(llava_config())
        llava.set_attn_implementation(attn_implementation)
        return llava.eval()
    head = "image" if model_type in VISION_FAMILIES else "sequence"
    return build_head(model_type, head, attn_implementation, seed)


def pad_token(model_type: str) -> int:
    return int(TEXT_CONFIGS[model_type]["pad_token_id"])


def text_batch(
    model_type: str, batch: int = 2, seed: int = 0, length: int = SEQ_LEN, right_pad: list[int] | None = None,
    left_pad: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (ids 3.. avoid special tokens; padding is the family's pad token) and ``attention_mask``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 1, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    pad = pad_token(model_type) if model_type in TEXT_CONFIGS else 0
    for row, count in enumerate(right_pad or []):
        if count:
            attention_mask[row, -count:] = 0
            input_ids[row, -count:] = pad
    for row, count in enumerate(left_pad or []):
        attention_mask[row, :count] = 0
        input_ids[row, :count] = pad
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def image_batch(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``pixel_values`` ``(B, 3, IMAGE_SIZE, IMAGE_SIZE)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def llava_batch(batch: int = 2, seed: int = 0, left_pad: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Text with one image (``IMAGE_TOKENS`` placeholders after the first token), optional left padding."""
    text = text_batch("bert", batch, seed, length=SEQ_LEN, left_pad=left_pad)
    start = max(left_pad or [0]) + 1
    text["input_ids"][:, start : start + IMAGE_TOKENS] = IMAGE_TOKEN
    return {**text, "pixel_values": image_batch(batch, seed)}


def example_inputs(model_type: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``build(model_type)``; text rows after the first are right-padded by one token."""
    if model_type in VISION_FAMILIES:
        return {"pixel_values": image_batch(batch, seed)}
    if model_type == LLAVA:
        return llava_batch(batch, seed)
    return text_batch(model_type, batch, seed, right_pad=[0] + [1] * (batch - 1))


def attach_random_prefix(
    model: PreTrainedModel, num_virtual_tokens: int, seed: int = 2, **overrides: Any
) -> PrefixAttachment:
    """A (not yet attached) prefix whose encoder has normal weights from ``seed``, so the prefix matters."""
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, **overrides))
    normal_weights(handle.encoder, torch.Generator().manual_seed(seed))
    return handle
