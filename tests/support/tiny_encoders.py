"""Tiny, seeded encoder, vision and multimodal (llava) models, built from configs (no hub).

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
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

VOCAB = 96
NUM_LABELS = 3
SEQ_LEN = 7
IMAGE_SIZE = 16
PATCH_SIZE = 8  # (16 / 8)^2 = 4 patches per image
IMAGE_TOKEN = VOCAB - 1  # llava's placeholder token
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # llava drops the CLS feature ("default" strategy)

_BERT_LIKE = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
_VISION = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": 3, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {**_BERT_LIKE, "pad_token_id": 0},
    "roberta": {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "xlm-roberta": {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "electra": {**_BERT_LIKE, "embedding_size": 16, "pad_token_id": 0},  # embeddings narrower than hidden
    "distilbert": {
        "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0,
    },
    "modernbert": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": VOCAB, "max_position_embeddings": 64,
        "global_attn_every_n_layers": 2, "local_attention": 4,  # layer 1 slides: 2 keys either side
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2,
        "embedding_dropout": 0.0, "attention_dropout": 0.0, "mlp_dropout": 0.0,
    },
}
VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "vit": _VISION,
    "deit": {**_VISION, "architectures": ["DeiTForImageClassification"]},  # not the with-teacher variant
    "dinov2": {**_VISION, "mlp_ratio": 2},
}
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
        return _llava_config(**overrides)
    settings = TEXT_CONFIGS.get(model_type) or VISION_CONFIGS.get(model_type)
    if settings is None:
        raise ValueError(f"no tiny config for model_type={model_type!r}; have {', '.join(FAMILIES)}")
    return AutoConfig.for_model(model_type, **{**settings, "num_labels": NUM_LABELS, **overrides})


def _llava_config(**overrides: Any) -> LlavaConfig:
    vision = {
        "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 32,
    }
    text = {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", **overrides,
    )


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
        llava = LlavaForConditionalGeneration(_llava_config())
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
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return handle
