"""Tiny, seeded models of every supported family, built from configs (no downloads), for
``python -m prefix_hooks.check``; the test suite builds its tiny models from the same configs.

Every model has 2 layers of width 32 (4 heads), runs in float32 in eval mode and is built by
transformers' own ``from_config`` with its default attention implementation, so the check
exercises what a user's installed transformers gives them. Dropout is off everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
)

__all__ = [
    "DECODERS",
    "ENCODERS",
    "FAMILIES",
    "GENERATING",
    "KINDS",
    "SEQ2SEQ",
    "VARIANTS",
    "VISION",
    "WHISPER",
    "build",
    "example_inputs",
    "kind_of",
    "llava_config",
    "stream_key",
]

VOCAB = 96
SEQ_LEN = 7  # decoder and encoder token inputs
DECODER_LEN = 5  # encoder-decoders' decoder_input_ids
NUM_LABELS = 3
IMAGE_SIZE = 16
PATCH_SIZE = 8  # (16 / 8)^2 = 4 patches per image
IMAGE_TOKEN = VOCAB - 1  # llava's placeholder token
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # llava drops the CLS feature ("default" strategy)
MEL_BINS = 8
AUDIO_FRAMES = 8  # whisper's max_source_positions; input_features carry twice as many
PAD, BOS, EOS = 0, 1, 2
DECODER_START = BOS  # encoder-decoders' decoder_start_token_id

_IDS = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS, "vocab_size": VOCAB}

# --- decoders ---------------------------------------------------------------------------
_LLAMA_LIKE = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, **_IDS,
}
_GPTJ_LIKE = {  # gptj and codegen: rotary on 4 of each head's 8 features
    "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 256, "resid_pdrop": 0.0,
    "embd_pdrop": 0.0, "attn_pdrop": 0.0, **_IDS,
}
DECODERS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": 64},
    "qwen2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16},  # explicit head_dim != hidden / heads
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "gemma2": {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 64},
    # one sliding and one full-attention layer (the default pattern makes both tiny layers slide)
    "gemma3_text": {
        **_LLAMA_LIKE, "head_dim": 8, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": _LLAMA_LIKE,
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, **_IDS},
    "gpt_neox": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 256, **_IDS,
    },
    "opt": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64, "word_embed_proj_dim": 32,
        "max_position_embeddings": 256, **_IDS,
    },
    "falcon": {  # multi-query (one kv head), rotary, parallel attention
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, **_IDS,
    },
    "gptj": _GPTJ_LIKE,
    "codegen": {**_GPTJ_LIKE, "n_ctx": 256},
    "gpt_neo": {  # layer 0 global, layer 1 local
        "hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]],
        "window_size": 256, "max_position_embeddings": 256, "embed_dropout": 0.0, "attention_dropout": 0.0,
        "resid_dropout": 0.0, **_IDS,
    },
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4, "attention_dropout": 0.0, "hidden_dropout": 0.0, **_IDS},
    "mpt": {"d_model": 32, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2, "max_seq_len": 64, "use_cache": True, **_IDS},
}
"""Decoder model type -> its tiny config (``AutoConfig.for_model`` keywords)."""

# --- encoders -----------------------------------------------------------------------------
_BERT_LIKE = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": VOCAB,
    "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}
ENCODERS: dict[str, dict[str, Any]] = {
    "bert": {**_BERT_LIKE, "pad_token_id": PAD},
    "roberta": {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "xlm-roberta": {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "electra": {**_BERT_LIKE, "embedding_size": 16, "pad_token_id": PAD},  # embeddings narrower than hidden
    "distilbert": {
        "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": PAD,
    },
    "modernbert": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "vocab_size": VOCAB, "max_position_embeddings": 64,
        "global_attn_every_n_layers": 2, "local_attention": 4,  # layer 1 slides: 2 keys either side
        "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS, "cls_token_id": BOS, "sep_token_id": EOS,
        "embedding_dropout": 0.0, "attention_dropout": 0.0, "mlp_dropout": 0.0,
    },
}
"""Text encoder model type -> its tiny config."""

_VISION = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": 3, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
VISION: dict[str, dict[str, Any]] = {
    "vit": _VISION,
    "deit": {**_VISION, "architectures": ["DeiTForImageClassification"]},  # not the with-teacher variant
    "dinov2": {**_VISION, "mlp_ratio": 2},
}
"""Vision encoder model type -> its tiny config."""

# --- encoder-decoders -------------------------------------------------------------------
_SEQ2SEQ_IDS = {**_IDS, "decoder_start_token_id": DECODER_START}
_BART_LIKE = {
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, **_SEQ2SEQ_IDS,
}
SEQ2SEQ: dict[str, dict[str, Any]] = {
    "t5": {
        "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "dropout_rate": 0.0,
        **_SEQ2SEQ_IDS,
    },
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
}
"""Text encoder-decoder model type -> its tiny config."""

WHISPER: dict[str, Any] = {
    **_BART_LIKE, "num_mel_bins": MEL_BINS, "max_source_positions": AUDIO_FRAMES, "max_target_positions": 64,
    "suppress_tokens": None, "begin_suppress_tokens": None,
}
"""Whisper's tiny config."""

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "falcon": {
        "gqa": {"new_decoder_architecture": True, "num_kv_heads": 2},  # grouped keys/values (Falcon-40B's layout)
        "alibi": {"alibi": True, "multi_query": False, "parallel_attn": False},  # no rotary: alibi biases
    },
    "mistral": {"window": {"sliding_window": 4}},  # windows shorter than the sequences checked
    "gemma3_text": {"window": {"sliding_window": 4}},
    "gpt_neo": {"window": {"window_size": 4}},
}
"""Decoder family -> variant name -> config overrides: configurations that take other code paths
than the family's default tiny model (``build(family, variant=name)``)."""

LEFT_PADDED_ENCODERS = frozenset({"t5"})
"""Encoder-decoders padded on the left (relative positions); bart and mbart give encoder tokens
absolute positions from 0, so they are padded on the right."""

KINDS: dict[str, tuple[str, ...]] = {
    "decoder-only": tuple(DECODERS),
    "encoder-only": tuple(ENCODERS),
    "encoder-decoder": tuple(SEQ2SEQ),
    "vision": tuple(VISION),
    "speech": ("whisper",),
    "multimodal": ("llava",),
}
"""Family kind -> model types, in the order of docs/families.md."""

FAMILIES: tuple[str, ...] = tuple(family for families in KINDS.values() for family in families)

GENERATING = frozenset((*KINDS["decoder-only"], *KINDS["encoder-decoder"], "whisper", "llava"))
"""Families with a language-model head that decodes token by token with a cache."""


def kind_of(family: str) -> str:
    """The kind (a key of :data:`KINDS`) of ``family``.

    Raises:
        KeyError: no tiny model of ``family``.
    """
    for kind, families in KINDS.items():
        if family in families:
            return kind
    raise KeyError(f"no tiny model for model_type={family!r}; have {', '.join(FAMILIES)}")


def stream_key(family: str) -> str:
    """The input that grows one token per decoding step: ``decoder_input_ids`` for encoder-decoders."""
    return "decoder_input_ids" if kind_of(family) in ("encoder-decoder", "speech") else "input_ids"


def llava_config(**overrides: Any) -> LlavaConfig:
    """Llava's tiny config: a CLIP vision tower and llama's tiny text model; ``overrides`` go to ``LlavaConfig``."""
    vision = {
        "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 32,
    }
    text = {"model_type": "llama", **_LLAMA_LIKE}
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default", **overrides,
    )


def build(family: str, seed: int = 0, variant: str = "") -> PreTrainedModel:
    """A freshly initialised tiny model of ``family`` (its usual task model: causal LM, sequence
    or image classification, seq2seq LM, llava's generator), eval mode, float32; ``variant``
    names one of the family's :data:`VARIANTS`.

    Raises:
        KeyError: no tiny model of ``family``, or no such variant.
    """
    kind = kind_of(family)
    if variant and variant not in VARIANTS.get(family, {}):
        raise KeyError(f"no variant {variant!r} of {family}; have {', '.join(VARIANTS.get(family, {})) or 'none'}")
    torch.manual_seed(seed)
    model: PreTrainedModel
    if family == "llava":
        model = LlavaForConditionalGeneration(llava_config())
    elif kind == "decoder-only":
        settings = {**DECODERS[family], **VARIANTS.get(family, {}).get(variant, {})}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings))
    elif kind == "encoder-only":
        config = AutoConfig.for_model(family, **ENCODERS[family], num_labels=NUM_LABELS)
        model = AutoModelForSequenceClassification.from_config(config)
    elif kind == "vision":
        config = AutoConfig.for_model(family, **VISION[family], num_labels=NUM_LABELS)
        model = AutoModelForImageClassification.from_config(config)
    elif kind == "speech":
        model = AutoModelForSpeechSeq2Seq.from_config(AutoConfig.for_model(family, **WHISPER))
    else:
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(family, **SEQ2SEQ[family]))
    return model.eval()


def _token_ids(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, length)`` ids from 3 up, avoiding the special tokens and llava's image token."""
    return torch.randint(3, VOCAB - 1, (batch, length), generator=generator)


def example_inputs(family: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for one forward of ``build(family)``, with padding where the family takes a mask:
    decoders' row 1 left-padded by 2, text encoders' right-padded by 1, encoder-decoders' encoder
    input padded by 2 (left for t5, right for bart/mbart) plus ``decoder_input_ids`` starting
    with the decoder start token; images ``(B, 3, 16, 16)``; whisper's features ``(B, 8, 16)``."""
    kind = kind_of(family)
    generator = torch.Generator().manual_seed(seed)
    pads = [0, 2, 1, 3][:batch] + [0] * max(0, batch - 4)
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    if kind == "speech":
        features = torch.randn(batch, MEL_BINS, 2 * AUDIO_FRAMES, generator=generator)
        return {"input_features": features, "decoder_input_ids": _decoder_ids(batch, generator)}
    length = SEQ_LEN + IMAGE_TOKENS if kind == "multimodal" else SEQ_LEN  # llava: text, image, text
    input_ids = _token_ids(batch, length, generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    pad_id = int(ENCODERS.get(family, {}).get("pad_token_id", PAD))
    left = kind in ("decoder-only", "multimodal") or family in LEFT_PADDED_ENCODERS
    for row, count in enumerate(pads if kind != "encoder-only" else [min(pad, 1) for pad in pads]):
        if count:
            padding = slice(0, count) if left else slice(length - count, length)
            attention_mask[row, padding] = 0
            input_ids[row, padding] = pad_id
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind == "encoder-decoder":
        inputs["decoder_input_ids"] = _decoder_ids(batch, generator)
    if kind == "multimodal":  # one image after the first real token of the longest row
        start = max(pads) + 1
        input_ids[:, start : start + IMAGE_TOKENS] = IMAGE_TOKEN
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return inputs


def _decoder_ids(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``(batch, DECODER_LEN)`` decoder tokens starting with ``decoder_start_token_id``."""
    ids = _token_ids(batch, DECODER_LEN, generator)
    ids[:, 0] = DECODER_START
    return ids
