"""Independent oracles for the inline-attention families (no PEFT, none of our splice code).

* A prompt's own cache as the prefix: a prefix holding the keys/values the base model
  cached for ``prompt`` must make ``model(text)`` give the logits of ``model(prompt + text)``
  at the text tokens (every variant, backend, with and without left padding).
* Hand-written attention: one layer recomputed from its captured input with plain tensor
  algebra (projections, rotary on part of the head or on all of it, alibi with the prefix
  at ``-P..-1``, MPT's slot-relative alibi, GPT-Neo's slot window), prefix keys/values in
  front; every Falcon layout (multi-query, full, grouped, alibi), GPT-J, CodeGen, BLOOM,
  MPT and GPT-Neo's global and local layers, on each backend the family builds with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tiny_inline import VARIANTS, build_variant, implementations, variant_backend_pairs
from tiny_models import random_batch
from torch import Tensor, nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import ALIBI_KEYWORD, forward_parameters, output_cache

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
PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # GPT-J's and GPT-Neo's separate projections


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
    cache = output_cache(model(input_ids=prompt, use_cache=True))
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, kv_heads, P, D)
    return torch.stack(per_layer).permute(3, 0, 1, 2, 4).reshape(prompt.shape[1], -1)


# variants whose positions are position_ids (rotary or learned); alibi ones take no offset
POSITIONED = frozenset({"falcon", "falcon_mha", "falcon_gqa", "gptj", "codegen", "gpt_neo", "gpt_neo_window"})
assert POSITIONED <= set(VARIANTS)
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


Captured = dict[str, Any]
"""The recomputed layer's call as the forward hook captured it: ``hidden``, ``residual``, ``output``,
and the ``position_ids`` the model was given."""


def _rotate_every_two(x: torch.Tensor, positions: torch.Tensor, rotary: int) -> torch.Tensor:
    """GPT-J/CodeGen rotary on the first ``rotary`` features of each head, interleaved pairs ``(x0, x1) -> (-x1, x0)``.

    ``x`` (B, H, T, D); ``positions`` (B, T)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)  # (R / 2,)
    angles = (positions.float()[..., None] * inv_freq).repeat_interleave(2, dim=-1)[:, None]  # (B, 1, T, R)
    part = x[..., :rotary]
    pairs = torch.stack([-part[..., 1::2], part[..., ::2]], dim=-1).flatten(-2)
    return torch.cat([part * angles.cos() + pairs * angles.sin(), x[..., rotary:]], dim=-1)


def _rotate_half(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama-style rotary over the whole head, halves ``(x1, x2) -> (-x2, x1)``.

    ``x`` (B, H, T, D); ``positions`` (B, T)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)  # (D / 2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D / 2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def _gptj(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """GPT-J: separate projections; rotary on the first ``rotary_dim`` features at positions ``P + pos``."""
    attention = model.get_submodule(case.path)
    hidden, heads, rotary = call["hidden"], model.config.n_head, model.config.rotary_dim
    query, key, value = (_heads(attention.get_submodule(name)(hidden), heads) for name in PROJECTIONS)
    positions = call["position_ids"] + P  # (B, T)
    query, key = _rotate_every_two(query, positions, rotary), _rotate_every_two(key, positions, rotary)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), query.shape[-1] ** -0.5)
    return attention.get_submodule("out_proj")(merged)  # (B, T, hidden)


def _codegen(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """CodeGen: one fused projection in 4 model-parallel shards, each ``[query; value; key]``; GPT-J's rotary."""
    attention = model.get_submodule(case.path)
    hidden, heads, rotary = call["hidden"], model.config.n_head, model.config.rotary_dim
    batch, seq_len, width = hidden.shape
    shards = attention.get_submodule("qkv_proj")(hidden).view(batch, seq_len, 4, 3 * width // 4)  # (B, T, 4, 3 * W / 4)
    query, value, key = (
        part.reshape(batch, seq_len, heads, -1).transpose(1, 2) for part in shards.split(width // 4, -1)
    )  # (B, H, T, D) each
    positions = call["position_ids"] + P  # (B, T)
    query, key = _rotate_every_two(query, positions, rotary), _rotate_every_two(key, positions, rotary)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), query.shape[-1] ** -0.5)
    return attention.get_submodule("out_proj")(merged)


def _falcon_alibi_terms(model: PreTrainedModel, case: Case) -> int:
    """How often the layer adds the alibi: twice on the eager path of the inline attention that takes
    ``alibi`` itself (transformers <= 5.23: once itself, once folded into the mask), else once."""
    takes_alibi = ALIBI_KEYWORD in forward_parameters(model.get_submodule(case.path))
    return 2 if takes_alibi and case.impl == "eager" else 1


def _falcon(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """Falcon: fused projection laid out per variant (multi-query: queries then one key and one value head;
    full: per head query, key, value; grouped: per kv group its queries, then its key and value);
    rotary over the whole head at ``P + pos``, or alibi (slopes rounded to bfloat16 as the model builds
    them, tokens at ``cumsum - 1``, the prefix at ``-P..-1``) divided by ``sqrt(D)``."""
    config = model.config
    attention = model.get_submodule(case.path)
    hidden, heads = call["hidden"], config.num_attention_heads
    batch, seq_len, width = hidden.shape
    head_dim = width // heads
    fused = attention.get_submodule("query_key_value")(hidden)
    if config.new_decoder_architecture:
        grouped = fused.view(batch, seq_len, config.num_kv_heads, heads // config.num_kv_heads + 2, head_dim)
        query, key, value = grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
    elif config.multi_query:
        split = fused.view(batch, seq_len, heads + 2, head_dim)
        query, key, value = split[..., :heads, :], split[..., -2:-1, :], split[..., -1:, :]
    else:
        query, key, value = fused.view(batch, seq_len, heads, 3, head_dim).unbind(3)
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, heads or kv_heads, T, D)
    if prefix.shape[1] != key.shape[1]:  # the layer caches its kv heads broadcast to every query head
        key = key.repeat_interleave(prefix.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(prefix.shape[1] // value.shape[1], dim=1)
    bias = None
    if config.alibi:
        tokens = (mask.cumsum(-1) - 1) * mask  # (B, T), pads at 0
        positions = torch.cat([torch.arange(-P, 0).expand(batch, -1), tokens], dim=1)  # (B, P + T)
        alibi = (_alibi_slopes(heads).bfloat16()[None, :, None] * positions[:, None, :]).float()  # (B, H, P + T)
        bias = _falcon_alibi_terms(model, case) * alibi[:, :, None, :] / head_dim**0.5  # (B, H, 1, P + T)
    else:
        positions = call["position_ids"] + P
        theta = float(config.rope_parameters["rope_theta"])
        query, key = _rotate_half(query, positions, theta), _rotate_half(key, positions, theta)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), head_dim**-0.5, bias)
    return attention.get_submodule("dense")(merged)


def _bloom(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """BLOOM: alibi ``slope * position`` with tokens at ``cumsum - 1`` and the prefix at ``-P..-1``."""
    attention = model.get_submodule(case.path)
    hidden, heads = call["hidden"], model.config.n_head
    batch, seq_len, width = hidden.shape
    fused = attention.get_submodule("query_key_value")(hidden).view(batch, seq_len, heads, 3, width // heads)
    query, key, value = (fused[..., index, :].transpose(1, 2) for index in range(3))  # (B, H, T, D)
    positions = torch.cat([torch.arange(-P, 0).expand(batch, -1), mask.cumsum(-1) - 1], dim=1)  # (B, P + T)
    bias = _alibi_slopes(heads)[None, :, None, None] * positions[:, None, None, :].float()  # (B, H, 1, P + T)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), (width // heads) ** -0.5, bias)
    return attention.get_submodule("dense")(merged) + call["residual"]  # (B, T, hidden)


def _mpt(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """MPT: alibi relative to the newest key slot, ``slope * (slot - (P + T - 1))``."""
    attention = model.get_submodule(case.path)
    hidden, heads = call["hidden"], model.config.n_heads
    seq_len, width = hidden.shape[1:]
    query, key, value = (_heads(part, heads) for part in attention.get_submodule("Wqkv")(hidden).chunk(3, dim=-1))
    slots = torch.arange(P + seq_len) - (P + seq_len - 1)  # (P + T,)
    bias = _alibi_slopes(heads)[:, None, None] * slots.float()  # (H, 1, P + T)
    merged = _attend(query, key, value, prefix, _slots_visible(mask, P), (width // heads) ** -0.5, bias)
    return attention.get_submodule("out_proj")(merged)


def _gpt_neo(model: PreTrainedModel, call: Captured, mask: Tensor, prefix: Tensor, case: Case) -> Tensor:
    """GPT-Neo: unscaled scores; causal over key slots (prefix slots included), and on a local layer
    only the last ``window_size`` slots."""
    attention = model.get_submodule(case.path)
    hidden, heads = call["hidden"], model.config.num_heads
    query, key, value = (_heads(attention.get_submodule(name)(hidden), heads) for name in PROJECTIONS)
    local = model.config.attention_layers[case.layer] == "local"
    visible = _slots_visible(mask, P, window=model.config.window_size if local else None)
    return attention.get_submodule("out_proj")(_attend(query, key, value, prefix, visible, 1.0))


ByHand = Callable[[PreTrainedModel, Captured, Tensor, Tensor, "Case"], Tensor]


@dataclass(frozen=True)
class Case:
    """One hand-written check: a variant on a backend, the layer recomputed and the module that runs it."""

    variant: str
    impl: str
    layer: int
    path: str
    oracle: ByHand
    overrides: tuple[tuple[str, Any], ...] = ()


_PATHS: dict[str, tuple[str, ByHand]] = {  # model type -> (attention module path with {layer}, oracle)
    "gptj": ("transformer.h.{layer}.attn", _gptj),
    "codegen": ("transformer.h.{layer}.attn", _codegen),
    "falcon": ("transformer.h.{layer}.self_attention", _falcon),
    "bloom": ("transformer.h.{layer}.self_attention", _bloom),
    "mpt": ("transformer.blocks.{layer}.attn", _mpt),
    "gpt_neo": ("transformer.h.{layer}.attn.attention", _gpt_neo),
}


def _case(variant: str, impl: str, layer: int = LAYER, **overrides: Any) -> Case:
    path, oracle = _PATHS[VARIANTS[variant][0]]
    return Case(variant, impl, layer, path.format(layer=layer), oracle, tuple(overrides.items()))


BY_HAND: dict[str, Case] = {
    f"{variant}-{impl}": _case(variant, impl) for variant in VARIANTS for impl in implementations(variant)
}
BY_HAND["gpt_neo-eager-global"] = _case("gpt_neo", "eager", layer=0)  # layer 0 is global, layer 1 local
# the prefix must not shorten the longest sequence MPT's alibi covers
BY_HAND["mpt-eager-full_length"] = _case("mpt", "eager", max_seq_len=SEQ_LEN)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_attention_layer_matches_hand_written_attention(name: str, padded: bool) -> None:
    """Oracle: the hooked layer's output recomputed by hand from its captured input."""
    case = BY_HAND[name]
    batch = _batch(padded)
    position_ids = _real_positions(batch["attention_mask"])
    model = build_variant(case.variant, case.impl, seed=MODEL_SEED, **dict(case.overrides))
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    _randomise(handle)
    captured: dict[str, Any] = {"position_ids": position_ids}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["residual"] = args[1] if len(args) > 1 else None
        captured["output"] = output[0]

    hook = model.get_submodule(case.path).register_forward_hook(capture, with_kwargs=True)
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    extra = {"position_ids": position_ids} if takes_positions else {}
    try:
        with handle, torch.no_grad():
            model(**batch, **extra)
            ours = captured["output"]  # (B, T, hidden)
            prefix = handle.layer_prefixes()[case.layer]  # (2, kv_heads, P, D)
            expected = case.oracle(model, captured, batch["attention_mask"], prefix, case)
            with handle.disabled():
                model(**batch, **extra)
            base = captured["output"]
    finally:
        hook.remove()

    real = batch["attention_mask"].bool()
    assert (ours[real] - base[real]).abs().max() > 1e-2, "the prefix must change the layer, or the test proves nothing"
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=0)
