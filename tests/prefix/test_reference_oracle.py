"""Independent oracles for prefix splicing, with neither PEFT nor our code in the loop.

* Hand-written attention: one attention layer recomputed from its captured input with
  plain tensor algebra (projections, RoPE, prefix concatenated in front of K/V, GQA
  repeat, masked softmax, output projection), compared to what the hooked layer returned.
* Prompt as prefix: a prefix made of the keys/values that the base model itself cached
  for a prompt must make ``model(text)`` behave exactly like ``model(prompt + text)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import output_cache

P = 4  # num_virtual_tokens
BATCH = 2
SEQ_LEN = 7
LEFT_PAD = [0, 3]  # row 0 unpadded, row 1 with three pad tokens on the left
LAYER = 1  # the attention layer recomputed by hand
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
PREFIX_SEED = 2
PROMPT_SEED = 3

BACKENDS = ["eager", "sdpa"]
PROMPT_FAMILIES = ["llama", "gpt2", "gpt_neox", "qwen3", "opt"]


def _batch(padded: bool, batch: int = BATCH, seed: int = BATCH_SEED) -> dict[str, torch.Tensor]:
    return random_batch(batch, SEQ_LEN, seed=seed, left_pad=LEFT_PAD[:batch] if padded else None)


def _randomise(handle: PrefixAttachment) -> None:
    """Give the encoder non-trivial weights (normal, fixed seed) so the prefix matters."""
    generator = torch.Generator().manual_seed(PREFIX_SEED)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


# --- a) hand-written attention ------------------------------------------------------


def _attention_module(model: PreTrainedModel, layer: int) -> nn.Module:
    if model.config.model_type == "gpt2":
        return model.get_submodule(f"transformer.h.{layer}.attn")
    return model.get_submodule(f"model.layers.{layer}.self_attn")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` (B, T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _visible(attention_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """bool (B, 1, T, P + T), ``True = attend``: every prefix column, then causal over
    real tokens with padded keys hidden."""
    seq_len = attention_mask.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # (T, T)
    real = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    prefix = torch.ones(attention_mask.shape[0], seq_len, num_prefix, dtype=torch.bool)  # (B, T, P)
    return torch.cat([prefix, real], dim=-1)[:, None]  # (B, 1, T, P + T)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """softmax(Q [Kp; K]^T * scaling + mask) [Vp; V], heads merged: (B, T, H * D).

    ``query`` is (B, H, T, D); ``key``/``value`` (B, kv_heads, T, D); the prefix
    (kv_heads, P, D). Query head ``h`` reads key/value head ``h // (H / kv_heads)``.
    """
    batch, heads, seq_len, _ = query.shape
    kv_heads = key.shape[1]
    key = torch.cat([prefix_key[None].expand(batch, -1, -1, -1), key], dim=2)  # (B, kv_heads, P + T, D)
    value = torch.cat([prefix_value[None].expand(batch, -1, -1, -1), value], dim=2)  # (B, kv_heads, P + T, D)
    key = key.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, P + T, D)
    value = value.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, P + T, D)
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, P + T)
    scores = scores.masked_fill(~_visible(attention_mask, prefix_key.shape[1]), float("-inf"))
    output = scores.softmax(dim=-1) @ value  # (B, H, T, D)
    return output.transpose(1, 2).reshape(batch, seq_len, -1)  # (B, T, H * D)


def _llama_attention_by_hand(
    model: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    attention = _attention_module(model, LAYER)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    batch, seq_len, _ = hidden.shape
    query = attention.get_submodule("q_proj")(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
    key = (
        attention.get_submodule("k_proj")(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    )  # (B, kv_heads, T, D)
    value = (
        attention.get_submodule("v_proj")(hidden).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    )  # (B, kv_heads, T, D)
    # Real tokens sit after the prefix: positions P..P+T-1 (PEFT's convention, the default offset).
    positions = torch.arange(P, P + seq_len)[None].expand(batch, -1)  # (B, T)
    cos, sin = model.model.rotary_emb(hidden, positions)  # (B, T, D) each
    query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    merged = _attend(query, key, value, prefix[0], prefix[1], attention_mask, head_dim**-0.5)
    return attention.get_submodule("o_proj")(merged)  # (B, T, hidden)


def _gpt2_attention_by_hand(
    model: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    attention = _attention_module(model, LAYER)
    config = model.config
    head_dim = config.n_embd // config.n_head
    batch, seq_len, width = hidden.shape
    # Conv1D: x @ W + b with W of shape (in, out).
    qkv = hidden @ attention.get_parameter("c_attn.weight") + attention.get_parameter(
        "c_attn.bias"
    )  # (B, T, 3 * hidden)
    query, key, value = (
        part.view(batch, seq_len, -1, head_dim).transpose(1, 2) for part in qkv.split(width, dim=-1)
    )  # (B, H, T, D) each
    merged = _attend(query, key, value, prefix[0], prefix[1], attention_mask, head_dim**-0.5)
    return merged @ attention.get_parameter("c_proj.weight") + attention.get_parameter("c_proj.bias")  # (B, T, hidden)


ATTENTION_BY_HAND = {"llama": _llama_attention_by_hand, "gpt2": _gpt2_attention_by_hand}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("attn_implementation", BACKENDS)
@pytest.mark.parametrize("family", sorted(ATTENTION_BY_HAND))
def test_attention_layer_matches_hand_written_attention(family: str, attn_implementation: str, padded: bool) -> None:
    """Oracle: the layer's attention recomputed by hand from its captured input
    (projections, RoPE at positions ``P..``, prefix keys/values in front, GQA repeat,
    causal + padding mask with ``P`` visible columns, softmax, output projection)."""
    batch = _batch(padded)
    model = build_model(family, attn_implementation, seed=MODEL_SEED)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    _randomise(handle)
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["output"] = output[0]

    hook = _attention_module(model, LAYER).register_forward_hook(capture, with_kwargs=True)
    try:
        with handle, torch.no_grad():
            model(**batch)
            prefix = handle.layer_prefixes()[LAYER]  # (2, kv_heads, P, D)
            expected = ATTENTION_BY_HAND[family](model, captured["hidden"], batch["attention_mask"], prefix)
    finally:
        hook.remove()

    real = batch["attention_mask"].bool()
    torch.testing.assert_close(captured["output"][real], expected[real], atol=ATOL, rtol=0)


# --- b) a prompt's own cache as the prefix --------------------------------------------


@torch.no_grad()
def _prompt_as_prefix(model: PreTrainedModel, prompt: torch.Tensor) -> torch.Tensor:
    """The base model's cached keys/values for ``prompt`` (1, P), in PEFT's flat layout:
    (P, L * 2 * kv_heads * D), for layer ``i`` keys then values, head-major."""
    cache = output_cache(model(input_ids=prompt, use_cache=True))
    per_layer = [
        torch.stack([layer.keys[0], layer.values[0]])  # (2, kv_heads, P, D)
        for layer in cache.layers
    ]
    stacked = torch.stack(per_layer)  # (L, 2, kv_heads, P, D)
    return stacked.permute(3, 0, 1, 2, 4).reshape(prompt.shape[1], -1)  # (P, L*2*kv_heads*D)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("attn_implementation", BACKENDS)
@pytest.mark.parametrize("family", PROMPT_FAMILIES)
def test_prompt_cache_as_prefix_equals_prompt_plus_text(family: str, attn_implementation: str, padded: bool) -> None:
    """Oracle: the base model on ``prompt + text``. A prefix holding the keys/values the
    base model cached for ``prompt`` (default offset: text at positions ``P..``) must give
    the same logits for ``text`` alone, at every real text token."""
    model = build_model(family, attn_implementation, seed=MODEL_SEED)
    prompt = random_batch(1, P, seed=PROMPT_SEED)["input_ids"]  # (1, P)
    text = _batch(padded)
    joined = {
        "input_ids": torch.cat([prompt.expand(BATCH, -1), text["input_ids"]], dim=1),  # (B, P + T)
        "attention_mask": torch.cat([torch.ones(BATCH, P, dtype=torch.long), text["attention_mask"]], dim=1),
    }
    with torch.no_grad():
        expected = model(**joined).logits[:, P:]  # (B, T, V)

    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    with torch.no_grad():
        handle.encoder.embedding.weight.copy_(_prompt_as_prefix(model, prompt))
    with handle, torch.no_grad():
        ours = model(**text).logits  # (B, T, V)

    real = text["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)
