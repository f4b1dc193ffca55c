"""The benchmark models: a small llama and a gpt2 of similar size, seeded, sdpa, float32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

MODEL_SEED = 0
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
FIRST_ORDINARY_ID = 3
"""Token ids drawn for inputs start here, so no input is a pad/bos/eos token."""


@dataclass(frozen=True)
class ModelSpec:
    """A named model config; every instance built from it has the same weights."""

    name: str
    config: Callable[[], PretrainedConfig]


_SPECIAL_IDS: dict[str, Any] = {"pad_token_id": PAD_TOKEN_ID, "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
# sizes by `quick`: tiny with the same structure, or the benchmark size of the issue
_LLAMA_SIZES: dict[bool, dict[str, Any]] = {
    True: {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256},
    False: {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048},
}
_GPT2_SIZES: dict[bool, dict[str, Any]] = {
    True: {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256},
    False: {"n_embd": 512, "n_layer": 8, "n_head": 8, "vocab_size": 32000, "n_positions": 2048},
}


def _llama(quick: bool) -> PretrainedConfig:
    return LlamaConfig(**_LLAMA_SIZES[quick], **_SPECIAL_IDS)


def _gpt2(quick: bool) -> PretrainedConfig:
    return GPT2Config(**_GPT2_SIZES[quick], **_SPECIAL_IDS)


def model_specs(quick: bool) -> list[ModelSpec]:
    """The llama and gpt2 specs, full size or (``quick``) tiny with the same structure."""
    return [
        ModelSpec("llama", lambda: _llama(quick)),
        ModelSpec("gpt2", lambda: _gpt2(quick)),
    ]


def build_model(spec: ModelSpec) -> PreTrainedModel:
    """A fresh instance of ``spec``: seeded weights, sdpa attention, float32, eval mode, frozen.

    The base stays frozen throughout: only adapter parameters are ever trained.
    """
    torch.manual_seed(MODEL_SEED)
    model = AutoModelForCausalLM.from_config(spec.config(), attn_implementation="sdpa", dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def random_tokens(spec_model: PreTrainedModel, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded ordinary token ids ``(batch, length)`` for ``spec_model``'s vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    vocab = spec_model.config.vocab_size
    return torch.randint(FIRST_ORDINARY_ID, vocab, (batch, length), generator=generator)  # (B, T)
