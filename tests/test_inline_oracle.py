"""Independent oracles for the inline-attention families (no PEFT, none of our splice code).

* A prompt's own cache as the prefix: a prefix holding the keys/values the base model
  cached for ``prompt`` must make ``model(text)`` give the logits of ``model(prompt + text)``
  at the text tokens (every variant, backend, with and without left padding).
* Hand-written attention: one layer recomputed from its captured input with plain tensor
  algebra (projections, rotary on part of the head, alibi with the prefix at ``-P..-1``,
  MPT's slot-relative alibi, GPT-Neo's slot window), prefix keys/values in front.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_inline import build_variant, variant_backend_pairs
from tiny_models import random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix

P = 4  # num_virtual_tokens
BATCH = 2
SEQ_LEN = 7
LEFT_PAD = [0, 3]
LAYER = 1  # the layer recomputed by hand (gpt_neo: the local one)
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
PREFIX_SEED = 2
PROMPT_SEED = 3


def _batch(padded: bool) -> dict[str, torch.Tensor]:
    return random_batch(BATCH, SEQ_LEN, seed=BATCH_SEED, left_pad=LEFT_PAD if padded else None)


def _real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that left padding does not advance: ``(B, T)``, pads at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# --- a) a prompt's cache as the prefix -------------------------------------------------------
@torch.no_grad()
def prompt_as_prefix(model: PreTrainedModel, prompt: torch.Tensor) -> torch.Tensor:
    """The base model's cached keys/values for ``prompt`` (1, P) in PEFT's flat layout
    ``(P, L * 2 * kv_heads * D)``: per layer keys then values, head-major."""
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, kv_heads, P, D)
    return torch.stack(per_layer).permute(3, 0, 1, 2, 4).reshape(prompt.shape[1], -1)


# variants whose positions are position_ids (rotary or learned); alibi ones take no offset
POSITIONED = frozenset({"falcon", "falcon_mha", "falcon_gqa", "gptj", "codegen", "gpt_neo", "gpt_neo_window"})
ORACLE_CASES = [
    (variant, impl, offset)
    for variant, impl in variant_backend_pairs()
    for offset in ([None, 0] if variant in POSITIONED else [None])
]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize(("variant", "attn_implementation", "offset"), ORACLE_CASES)
def test_prompt_cache_as_prefix_equals_prompt_plus_text(
    variant: str, attn_implementation: str, padded: bool, offset: int | None
) -> None:
    """Oracle: the base model on ``prompt + text``. The prefix sits right before the text:
    rotary/learned positions start at ``P`` (default offset), alibi places it at ``-P..-1``,
    GPT-Neo's window and MPT's bias count its slots, exactly as for a real prompt.
    With ``position_offset=0`` the text keeps positions ``0..``: the oracle then restarts
    the joined sequence's positions at the text (alibi families take no offset)."""
    model = build_variant(variant, attn_implementation, seed=MODEL_SEED)
    prompt = random_batch(1, P, seed=PROMPT_SEED)["input_ids"]  # (1, P)
    text = _batch(padded)
    joined = {
        "input_ids": torch.cat([prompt.expand(BATCH, -1), text["input_ids"]], dim=1),  # (B, P + T)
        "attention_mask": torch.cat([torch.ones(BATCH, P, dtype=torch.long), text["attention_mask"]], dim=1),
    }
    if offset == 0:
        joined["position_ids"] = torch.cat([torch.arange(P), torch.arange(SEQ_LEN)]).expand(BATCH, -1)  # (B, P + T)
    with torch.no_grad():
        expected = model(**joined).logits[:, P:]  # (B, T, V)
        base = model(**text).logits

    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, position_offset=offset))
    with torch.no_grad():
        handle.encoder.embedding.weight.copy_(prompt_as_prefix(model, prompt))
    with handle, torch.no_grad():
        ours = model(**text).logits  # (B, T, V)
        uncached = model(**text, use_cache=False).logits  # the prefix is spliced without a cache too

    real = text["attention_mask"].bool()
    assert (ours[real] - base[real]).abs().max() > 1e-3, "the prompt must matter, or the test proves nothing"
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(uncached[real], expected[real], atol=ATOL, rtol=0)


# --- b) hand-written attention ---------------------------------------------------------------
def _randomise(handle: PrefixAttachment) -> None:
    generator = torch.Generator().manual_seed(PREFIX_SEED)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _slots_visible(attention_mask: torch.Tensor, num_prefix: int, window: int | None = None) -> torch.Tensor:
    """bool ``(B, 1, T, P + T)``, ``True = attend``. Keys are slots ``0..P-1`` (prefix) then ``P..``
    (tokens, pads included); query ``i`` is slot ``P + i``. Causal over slots, pads hidden, and
    with ``window`` only slots ``> query - window``. Without a window every prefix slot is visible."""
    batch, seq_len = attention_mask.shape
    query = torch.arange(seq_len)[:, None] + num_prefix  # (T, 1)
    key = torch.arange(num_prefix + seq_len)[None]  # (1, P + T)
    visible = key <= query  # (T, P + T)
    if window is not None:
        visible = visible & (key > query - window)
    keys_real = torch.cat([torch.ones(batch, num_prefix, dtype=torch.bool), attention_mask.bool()], dim=1)
    return (visible[None] & keys_real[:, None, :])[:, None]  # (B, 1, T, P + T)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: torch.Tensor,
            visible: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q [Kp; K]^T * scale + bias, masked) [Vp; V], heads merged: ``(B, T, H * D)``.

    ``query`` (B, H, T, D); ``key``/``value`` (B, kv_heads, T, D); ``prefix`` (2, kv_heads, P, D);
    ``bias`` broadcastable to (B, H, T, P + T)."""
    batch, heads, seq_len, _ = query.shape
    key = torch.cat([prefix[0][None].expand(batch, -1, -1, -1), key], dim=2)  # (B, kv_heads, P + T, D)
    value = torch.cat([prefix[1][None].expand(batch, -1, -1, -1), value], dim=2)
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (B, H, P + T, D)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * scale  # (B, H, T, P + T)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, seq_len, -1)  # (B, T, H * D)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H * D) -> (B, H, T, D)."""
    batch, seq_len, width = x.shape
    return x.view(batch, seq_len, heads, width // heads).transpose(1, 2)


def _alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes ``2^(-8 h / H)``, ``h = 1..H`` (H a power of two): ``(H,)``."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)


def _gptj(model: PreTrainedModel, call: dict[str, Any], mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """GPT-J: rotary on the first ``rotary_dim`` features, interleaved pairs, at positions ``P + pos``."""
    attention = model.get_submodule(f"transformer.h.{LAYER}.attn")
    hidden, heads, rotary = call["hidden"], model.config.n_head, model.config.rotary_dim
    query, key, value = (_heads(attention.get_submodule(name)(hidden), heads) for name in ("q_proj", "k_proj", "v_proj"))
    positions = (call["position_ids"] + P).float()  # (B, T)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)  # (R / 2,)
    angles = (positions[..., None] * inv_freq).repeat_interleave(2, dim=-1)[:, None]  # (B, 1, T, R)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D)
        part = x[..., :rotary]
        pairs = torch.stack([-part[..., 1::2], part[..., ::2]], dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
        return torch.cat([part * angles.cos() + pairs * angles.sin(), x[..., rotary:]], dim=-1)

    merged = _attend(rotate(query), rotate(key), value, prefix, _slots_visible(mask, P), query.shape[-1] ** -0.5)
    return attention.get_submodule("out_proj")(merged)  # (B, T, hidden)


def _bloom(model: PreTrainedModel, call: dict[str, Any], mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """BLOOM: alibi ``slope * position`` with tokens at ``cumsum - 1`` and the prefix at ``-P..-1``."""
    attention = model.get_submodule(f"transformer.h.{LAYER}.self_attention")
    hidden, heads = call["hidden"], model.config.n_head
    batch, seq_len, width = hidden.shape
    fused = attention.get_submodule("query_key_value")(hidden).view(batch, seq_len, heads, 3, width // heads)
    query, key, value = (fused[..., index, :].transpose(1, 2) for index in range(3))  # (B, H, T, D)
    positions = torch.cat([torch.arange(-P, 0).expand(batch, -1), mask.cumsum(-1) - 1], dim=1)  # (B, P + T)
    bias = _alibi_slopes(heads)[None, :, None, None] * positions[:, None, None, :].float()  # (B, H, 1, P + T)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), (width // heads) ** -0.5, bias)
    return attention.get_submodule("dense")(merged) + call["residual"]  # (B, T, hidden)


def _mpt(model: PreTrainedModel, call: dict[str, Any], mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """MPT: alibi relative to the newest key slot, ``slope * (slot - (P + T - 1))``."""
    attention = model.get_submodule(f"transformer.blocks.{LAYER}.attn")
    hidden, heads = call["hidden"], model.config.n_heads
    seq_len, width = hidden.shape[1:]
    query, key, value = (_heads(part, heads) for part in attention.get_submodule("Wqkv")(hidden).chunk(3, dim=-1))
    slots = torch.arange(P + seq_len) - (P + seq_len - 1)  # (P + T,)
    bias = _alibi_slopes(heads)[:, None, None] * slots.float()  # (H, 1, P + T)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), (width // heads) ** -0.5, bias)
    return attention.get_submodule("out_proj")(merged)


def _gpt_neo_window(model: PreTrainedModel, call: dict[str, Any], mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """GPT-Neo's local layer: unscaled scores, causal window over key slots (prefix slots included)."""
    attention = model.get_submodule(f"transformer.h.{LAYER}.attn.attention")
    hidden, heads = call["hidden"], model.config.num_heads
    query, key, value = (_heads(attention.get_submodule(name)(hidden), heads) for name in ("q_proj", "k_proj", "v_proj"))
    visible = _slots_visible(mask, P, window=model.config.window_size)
    return attention.get_submodule("out_proj")(_attend(query, key, value, prefix, visible, 1.0))


ByHand = Callable[[PreTrainedModel, dict[str, Any], torch.Tensor, torch.Tensor], torch.Tensor]
BY_HAND: dict[str, tuple[str, dict[str, Any], str, ByHand]] = {  # case -> (variant, overrides, module path, oracle)
    "gptj": ("gptj", {}, f"transformer.h.{LAYER}.attn", _gptj),
    "bloom": ("bloom", {}, f"transformer.h.{LAYER}.self_attention", _bloom),
    "mpt": ("mpt", {}, f"transformer.blocks.{LAYER}.attn", _mpt),
    # the prefix must not shorten the longest sequence MPT's alibi covers
    "mpt_full_length": ("mpt", {"max_seq_len": SEQ_LEN}, f"transformer.blocks.{LAYER}.attn", _mpt),
    "gpt_neo_window": ("gpt_neo_window", {}, f"transformer.h.{LAYER}.attn.attention", _gpt_neo_window),
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case", sorted(BY_HAND))
def test_attention_layer_matches_hand_written_attention(case: str, padded: bool) -> None:
    """Oracle: the hooked layer's output recomputed by hand from its captured input."""
    batch = _batch(padded)
    position_ids = _real_positions(batch["attention_mask"])
    variant, overrides, path, by_hand = BY_HAND[case]
    model = build_variant(variant, "eager", seed=MODEL_SEED, **overrides)
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    _randomise(handle)
    captured: dict[str, Any] = {"position_ids": position_ids}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["residual"] = args[1] if len(args) > 1 else None
        captured["output"] = output[0]

    hook = model.get_submodule(path).register_forward_hook(capture, with_kwargs=True)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    extra = {"position_ids": position_ids} if takes_positions else {}
    try:
        with handle, torch.no_grad():
            model(**batch, **extra)
            ours = captured["output"]  # (B, T, hidden)
            prefix = handle.layer_prefixes()[LAYER]  # (2, kv_heads, P, D)
            expected = by_hand(model, captured, batch["attention_mask"], prefix)
            with handle.disabled():
                model(**batch, **extra)
            base = captured["output"]
    finally:
        hook.remove()

    real = batch["attention_mask"].bool()
    assert (ours[real] - base[real]).abs().max() > 1e-2, "the prefix must change the layer, or the test proves nothing"
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)
