"""Encoder-decoder prefixes (the ``full`` layout) against oracles independent of our code.

* Hand-written attention: every encoder self-, decoder self- and cross-attention layer is
  recomputed from its captured input with plain tensor algebra (projections, the prefix read
  from the encoder weight in PEFT's documented layout and concatenated in front of K/V, T5's
  relative bias from the model's own ``compute_bias`` with zero prefix columns, masked softmax,
  output projection) and compared with what the hooked layer returned.
* Which stack each slot reaches: encoder slots change the encoder only, cross slots change the
  decoder with the encoder outputs held fixed.
* The same row alone and inside a padded batch; the same model in eager and sdpa.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from shared_fixtures import cache_kwargs
from tiny_seq2seq import DEEP_DECODER, FAMILIES, build, decoder_input_ids, depths, encoder_inputs, randomise
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.core.transformers_compat import output_cache

P = 3  # num_virtual_tokens
ATOL = 1e-5
PAD = [0, 3]  # row 0 unpadded, row 1 with three padding tokens
LAYOUTS = ["full", "peft"]
ORACLE_CASES = [
    *[(family, impl, {}) for family, impls in FAMILIES.items() for impl in impls],
    *[(family, "sdpa", DEEP_DECODER[family]) for family in ("t5", "bart")],
]


def _ids(case: tuple[str, str, dict[str, Any]]) -> str:
    family, impl, overrides = case
    return f"{family}-{impl}" + ("-deep_decoder" if overrides else "")


# --- hand-written attention -------------------------------------------------------------------
def _attention_modules(model: PreTrainedModel) -> dict[str, list[nn.Module]]:
    """role -> attention modules in layer order, found by the models' own attribute names."""
    t5 = model.config.model_type == "t5"
    roles: dict[str, list[nn.Module]] = {"encoder": [], "decoder": [], "cross": []}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("SelfAttention", "self_attn"):
            roles["encoder" if name.startswith(("encoder.", "model.encoder.")) else "decoder"].append(module)
        elif leaf == ("EncDecAttention" if t5 else "encoder_attn"):
            roles["cross"].append(module)
    return roles


def _full_layout_slot(role: str, index: int, depth_e: int, depth_d: int) -> int:
    """The documented ``full`` layout: encoder, then decoder self-attention, then cross-attention."""
    return {"encoder": index, "decoder": depth_e + index, "cross": depth_e + depth_d + index}[role]


@contextmanager
def _captured(modules: list[nn.Module]) -> Iterator[dict[nn.Module, dict[str, Any]]]:
    """Record each module's ``hidden_states``, ``key_value_states`` and attention output."""
    records: dict[nn.Module, dict[str, Any]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        records[module] = {"hidden": hidden, "source": kwargs.get("key_value_states"), "output": output[0]}

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in modules]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _hand_attention(
    module: Any, t5: bool, hidden: torch.Tensor, source: torch.Tensor, prefix: torch.Tensor,
    visible: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Attention over ``[prefix; source]``.

    Args:
        hidden: queries' input ``(B, T, d)``; source: keys' input ``(B, S, d)``.
        prefix: ``(2, H, P, D)`` keys and values.
        visible: ``(B, T, S)`` bool, True = the query may see the real key.
        bias: T5's relative bias over the real keys ``(H, T, S)``, or None.

    Returns:
        ``(B, T, d)`` after the output projection.
    """
    if t5:
        q_proj, k_proj, v_proj, o_proj = module.q, module.k, module.v, module.o
        heads, head_dim, scale = module.n_heads, module.key_value_proj_dim, 1.0
    else:
        q_proj, k_proj, v_proj, o_proj = module.q_proj, module.k_proj, module.v_proj, module.out_proj
        heads, head_dim = module.num_heads, module.head_dim
        scale = head_dim**-0.5
    batch, q_len, _ = hidden.shape
    num_prefix = prefix.shape[2]
    query = q_proj(hidden).view(batch, q_len, heads, head_dim).transpose(1, 2)  # (B, H, T, D)
    key = k_proj(source).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, S, D)
    value = v_proj(source).view(batch, -1, heads, head_dim).transpose(1, 2)
    key = torch.cat([prefix[0].expand(batch, -1, -1, -1), key], dim=2)  # (B, H, P + S, D)
    value = torch.cat([prefix[1].expand(batch, -1, -1, -1), value], dim=2)
    scores = query @ key.transpose(-1, -2) * scale  # (B, H, T, P + S)
    if bias is not None:
        scores = scores + torch.cat([bias.new_zeros(heads, q_len, num_prefix), bias], dim=-1)
    attend = torch.cat([visible.new_ones(batch, q_len, num_prefix), visible], dim=-1)  # (B, T, P + S)
    scores = scores.masked_fill(~attend[:, None], float("-inf"))
    out = scores.softmax(-1) @ value  # (B, H, T, D)
    return o_proj(out.transpose(1, 2).reshape(batch, q_len, heads * head_dim))


def _visible(role: str, batch: int, q_len: int, kv_len: int, encoder_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, S)`` bool: causal for decoder self-attention, encoder padding otherwise."""
    if role == "decoder":
        return torch.ones(q_len, kv_len, dtype=torch.bool).tril().expand(batch, -1, -1)
    if encoder_mask is None:
        return torch.ones(batch, q_len, kv_len, dtype=torch.bool)
    return encoder_mask.bool()[:, None, :].expand(-1, q_len, -1)


def _t5_bias(model: Any, role: str, q_len: int, kv_len: int) -> torch.Tensor | None:
    """T5's own relative bias (from its stack's first layer), ``(H, T, S)``; None for cross-attention."""
    if role == "cross":
        return None
    stack = model.encoder if role == "encoder" else model.decoder
    return stack.block[0].layer[0].SelfAttention.compute_bias(q_len, kv_len)[0]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=_ids)
def test_seq2seq_attention_matches_hand_written_oracle(case: tuple[str, str, dict[str, Any]]) -> None:
    family, impl, overrides = case
    model = build(family, impl, **overrides)
    t5 = family == "t5"
    depth_e, depth_d = depths(model)
    inputs = encoder_inputs(family, pad=PAD)
    encoder_mask = inputs.get("attention_mask")
    roles = _attention_modules(model)
    assert [len(roles[r]) for r in ("encoder", "decoder", "cross")] == [depth_e, depth_d, depth_d]
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    randomise(handle.encoder)
    heads = handle.config.num_attention_heads
    assert heads is not None and handle.config.token_dim is not None
    weight = handle.encoder.embedding.weight.detach()  # (P, L * 2 * H * D), PEFT's layout
    per_slot = weight.view(P, depth_e + 2 * depth_d, 2, heads, handle.config.token_dim // heads)
    per_slot = per_slot.permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)

    modules = [m for role in roles.values() for m in role]
    with torch.no_grad(), handle, _captured(modules) as records:
        model(**inputs, decoder_input_ids=decoder_input_ids())

    checked = 0
    for role, role_modules in roles.items():
        for index, module in enumerate(role_modules):
            record = records[module]
            source = record["source"] if role == "cross" else record["hidden"]
            batch, q_len, kv_len = record["hidden"].shape[0], record["hidden"].shape[1], source.shape[1]
            visible = _visible(role, batch, q_len, kv_len, encoder_mask if role != "decoder" else None)
            bias = _t5_bias(model, role, q_len, kv_len) if t5 else None
            prefix = per_slot[_full_layout_slot(role, index, depth_e, depth_d)]
            with torch.no_grad():
                expected = _hand_attention(module, t5, record["hidden"], source, prefix, visible, bias)
                without = _hand_attention(module, t5, record["hidden"], source, prefix[:, :, :0], visible, bias)
            assert (expected - without).abs().max() > 1e-3, "the prefix must matter, or the check proves nothing"
            torch.testing.assert_close(record["output"], expected, atol=ATOL, rtol=0)
            checked += 1
    assert checked == depth_e + 2 * depth_d


# --- which stack each slot reaches ------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_seq2seq_encoder_prefix_changes_encoder_outputs(family: str) -> None:
    """Full layout: the encoder (called alone, as generate() calls it) changes; PEFT's layout
    leaves it bit-for-bit untouched."""
    model = build(family)
    inputs = encoder_inputs(family, pad=PAD)
    with torch.no_grad():
        base = model.get_encoder()(**inputs).last_hidden_state
        outputs = {}
        for layout in LAYOUTS:
            with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout)) as h:
                randomise(h.encoder)
                outputs[layout] = model.get_encoder()(**inputs).last_hidden_state
    assert (outputs["full"] - base).abs().max() > 1e-2
    torch.testing.assert_close(outputs["peft"], base, atol=0, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_seq2seq_cross_prefix_changes_decoder_with_encoder_fixed(family: str) -> None:
    """With the base model's encoder outputs passed in, changing only the cross-attention slots
    changes the logits, and changing only the encoder slots changes nothing."""
    model = build(family)
    inputs = encoder_inputs(family, pad=PAD)
    depth_e, depth_d = depths(model)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(**inputs)
    decoder_kwargs = {
        "encoder_outputs": encoder_outputs, "decoder_input_ids": decoder_input_ids(),
        "attention_mask": inputs.get("attention_mask"),
    }
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    randomise(handle.encoder)
    per_slot = handle.encoder.embedding.weight.view(P, depth_e + 2 * depth_d, -1)  # (P, L, 2*H*D)
    with torch.no_grad(), handle:
        reference = model(**decoder_kwargs).logits
        per_slot[:, :depth_e] += 1.0  # encoder slots only
        encoder_slots_changed = model(**decoder_kwargs).logits
        per_slot[:, depth_e + depth_d :] += 1.0  # cross-attention slots only
        cross_slots_changed = model(**decoder_kwargs).logits
    torch.testing.assert_close(encoder_slots_changed, reference, atol=0, rtol=0)
    assert (cross_slots_changed - reference).abs().max() > 1e-3


# --- padding and backends ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["t5", "bart", "mbart"])
def test_seq2seq_padded_row_equals_row_alone(family: str, layout: str) -> None:
    """Encoder-side padding (left for t5, right for bart/mbart, whose encoder positions are
    absolute): the padded row's logits equal those of the same row run alone."""
    model = build(family)
    inputs = encoder_inputs(family, pad=PAD)
    decoder_ids = decoder_input_ids()
    real = inputs["attention_mask"][1].bool()
    with torch.no_grad(), attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout)) as h:
        randomise(h.encoder)
        batched = model(**inputs, decoder_input_ids=decoder_ids).logits  # (2, T, V)
        alone = model(input_ids=inputs["input_ids"][1:2, real], decoder_input_ids=decoder_ids[1:2]).logits
    torch.testing.assert_close(batched[1:2], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_seq2seq_eager_matches_sdpa(family: str, layout: str) -> None:
    inputs = {**encoder_inputs(family, pad=PAD if family != "whisper" else None), "decoder_input_ids": decoder_input_ids()}
    logits = {}
    for impl in ("eager", "sdpa"):
        model = build(family, impl)
        with torch.no_grad(), attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_decoder_layout=layout)) as h:
            randomise(h.encoder)
            logits[impl] = model(**inputs).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=ATOL, rtol=0)


# --- learned positions ------------------------------------------------------------------------
def _looked_up_rows(table: nn.Embedding, call: Any) -> torch.Tensor:
    """The rows of the position table ``table`` that ``call()`` looked up, recovered from the
    lookup's output (nearest row): shaped like its leading dimensions, ``(..., T)``."""
    outputs: list[torch.Tensor] = []
    handle = table.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    (output,) = outputs  # (..., T, d)
    weight = table.weight  # (N, d)
    distances = torch.cdist(output.reshape(-1, weight.shape[1]), weight)  # (rows, N)
    return distances.argmin(-1).view(output.shape[:-1])  # (..., T)


@pytest.mark.parametrize("position_offset", [None, 0, 5])
@pytest.mark.parametrize("family", ["bart", "mbart", "whisper"])
def test_seq2seq_learned_positions_follow_the_prefix(family: str, position_offset: int | None) -> None:
    """Oracle: the rows each stack reads from its own position table. ``None``: the decoder's
    tokens sit at ``P..`` (as behind PEFT's cached prefix), the encoder's at ``0..``; an explicit
    offset moves both (whisper's encoder positions cannot move and refuse it, see test_seq2seq_peft)."""
    if family == "whisper" and position_offset:
        position_offset = None
    model: Any = build(family)
    inputs = encoder_inputs(family)
    decoder_ids = decoder_input_ids()
    config = PrefixTuningConfig(num_virtual_tokens=P, position_offset=position_offset)
    decoder_table, encoder_table = model.model.decoder.embed_positions, model.model.encoder.embed_positions
    table_offset = getattr(decoder_table, "offset", 0)  # bart/mbart store position i at row i + 2
    with attach_prefix(model, config) as handle:
        randomise(handle.encoder)
        decoder_rows = _looked_up_rows(decoder_table, lambda: model(**inputs, decoder_input_ids=decoder_ids))
        encoder_rows = _looked_up_rows(encoder_table, lambda: model.get_encoder()(**inputs))
        cache = output_cache(model(**inputs, decoder_input_ids=decoder_ids[:, :3], use_cache=True))
        step_rows = _looked_up_rows(
            decoder_table,
            lambda: model(**inputs, decoder_input_ids=decoder_ids[:, 3:4], **cache_kwargs(model, cache), use_cache=True),
        )
    decoder_start = P if position_offset is None else position_offset
    encoder_start = position_offset or 0
    assert (decoder_rows == torch.arange(decoder_ids.shape[1]) + decoder_start + table_offset).all()
    assert (step_rows == decoder_start + 3 + table_offset).all()
    encoder_len = encoder_rows.shape[-1]
    assert (encoder_rows == torch.arange(encoder_len) + encoder_start + table_offset).all()
