"""Prefix tuning on bidirectional encoders (bert, roberta, xlm-roberta, electra, distilbert,
modernbert), vision encoders (vit, deit, dinov2) and llava's language model.

Oracles, none of which runs our splice code:

* a hand-written attention layer (projections, RoPE where the family has it, the prefix
  concatenated in front of the keys/values, a bidirectional (or, for llava's language
  model, causal) padding mask, softmax, output projection) recomputed from the layer's
  captured input;
* the same row alone versus inside a padded batch;
* eager versus sdpa on identical weights;
* the embeddings module called by hand with the positions PEFT gives real tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot
from tiny_encoders import (
    FAMILIES,
    IMAGE_TOKEN,
    LLAVA,
    TEXT_FAMILIES,
    VISION_FAMILIES,
    attach_random_prefix,
    build,
    build_head,
    example_inputs,
    llava_batch,
    text_batch,
)
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix, supported

P = 4  # num_virtual_tokens
ATOL = 1e-5
MODEL_SEED = 0
BATCH_SEED = 1
PREFIX_SEED = 2
RIGHT_PAD = [0, 3]  # row 0 full, row 1 with three pad tokens on the right
LEFT_PAD = [0, 2]
ALL_FAMILIES = sorted(FAMILIES)
BACKENDS = ["eager", "sdpa"]
POSITION_PAD_AWARE = ("roberta", "xlm-roberta")  # positions count real tokens only: left padding is invisible


def prefixed(model: PreTrainedModel, **overrides: Any) -> PrefixAttachment:
    return attach_random_prefix(model, P, PREFIX_SEED, **overrides)


def _inputs(family: str, padding: str = "right") -> dict[str, torch.Tensor]:
    if family in VISION_FAMILIES:
        return example_inputs(family, 2, BATCH_SEED)
    if family == LLAVA:
        return llava_batch(2, BATCH_SEED)
    pads: dict[str, Any] = {"right": {"right_pad": RIGHT_PAD}, "left": {"left_pad": LEFT_PAD}, "none": {}}[padding]
    return text_batch(family, 2, BATCH_SEED, **pads)


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


# --- a) every family: the prefix changes outputs, not shapes -----------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefix_changes_outputs_not_shapes(family: str) -> None:
    model = build(family, "sdpa", MODEL_SEED)
    inputs = _inputs(family)
    base = _logits(model, inputs)
    with prefixed(model):
        ours = _logits(model, inputs)
    assert ours.shape == base.shape
    assert torch.isfinite(ours).all()
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, inputs), base, atol=0, rtol=0)  # detached: the base again
    assert family in supported()


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vision_cls_output_changes(family: str) -> None:
    model = build_head(family, "features", "sdpa", MODEL_SEED)
    pixel_values = example_inputs(family, 2, BATCH_SEED)["pixel_values"]
    with torch.no_grad():
        base = model(pixel_values=pixel_values).last_hidden_state
        with prefixed(model):
            ours = model(pixel_values=pixel_values).last_hidden_state
    assert ours.shape == base.shape  # the prefix adds keys, never tokens
    assert (ours[:, 0] - base[:, 0]).abs().max() > 1e-3  # the CLS token


# --- b) hand-written attention -------------------------------------------------------------


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, -1, head_dim).transpose(1, 2)  # (B, heads, T, D)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` (B, T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: torch.Tensor, visible: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """softmax(Q [Kp; K]^T * scaling, real keys hidden where ``visible`` is False) [Vp; V]: (B, T, H * D).

    ``query`` (B, H, T, D); ``key``/``value`` (B, kv_heads, T, D); ``prefix`` (2, kv_heads, P, D);
    ``visible`` bool (B, T, T) over the real keys. Query head ``h`` reads kv head ``h // (H / kv_heads)``.
    """
    batch, heads, seq_len, _ = query.shape
    groups = heads // key.shape[1]
    key = torch.cat([prefix[0][None].expand(batch, -1, -1, -1), key], dim=2).repeat_interleave(groups, dim=1)
    value = torch.cat([prefix[1][None].expand(batch, -1, -1, -1), value], dim=2).repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, P + T)
    num_prefix = prefix.shape[2]
    allowed = torch.cat([torch.ones(batch, seq_len, num_prefix, dtype=torch.bool), visible], dim=-1)  # (B, T, P + T)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    output = scores.softmax(dim=-1) @ value  # (B, H, T, D)
    return output.transpose(1, 2).reshape(batch, seq_len, -1)  # (B, T, H * D)


def _bidirectional(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool (B, T, T): every query sees every real key."""
    return attention_mask.bool()[:, None, :].expand(-1, seq_len, -1)


def _projected(names: tuple[str, str, str, str | None]) -> Callable[..., torch.Tensor]:
    """Attention by hand for modules with separate q/k/v projections named ``names``
    (and an output projection, or ``None`` when the module returns the merged heads)."""
    q_name, k_name, v_name, out_name = names

    def by_hand(model: PreTrainedModel, layer: int, hidden: torch.Tensor, mask: torch.Tensor,
                prefix: torch.Tensor) -> torch.Tensor:
        attention = _attention_modules(model)[layer]
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        query, key, value = (
            _heads(attention.get_submodule(name)(hidden), head_dim) for name in (q_name, k_name, v_name)
        )  # (B, H, T, D) each
        merged = _attend(query, key, value, prefix, _bidirectional(mask, hidden.shape[1]), head_dim**-0.5)
        return merged if out_name is None else attention.get_submodule(out_name)(merged)

    return by_hand


def _modernbert(model: PreTrainedModel, layer: int, hidden: torch.Tensor, mask: torch.Tensor,
                prefix: torch.Tensor) -> torch.Tensor:
    attention = _attention_modules(model)[layer]
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    batch, seq_len, _ = hidden.shape
    query, key, value = attention.get_submodule("Wqkv")(hidden).view(batch, seq_len, 3, -1, head_dim).unbind(2)
    query, key, value = (part.transpose(1, 2) for part in (query, key, value))  # (B, H, T, D) each
    layer_type = config.layer_types[layer]
    positions = torch.arange(P, P + seq_len)[None].expand(batch, -1)  # real tokens after the prefix
    cos, sin = model.base_model.get_submodule("rotary_emb")(hidden, positions, layer_type)  # (B, T, D) each
    query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    visible = _bidirectional(mask, seq_len)
    if layer_type == "sliding_attention":
        distance = (torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None]).abs()  # (T, T)
        visible = visible & (distance <= config.local_attention // 2)
    merged = _attend(query, key, value, prefix, visible, head_dim**-0.5)
    return attention.get_submodule("Wo")(merged)


def _llava(model: PreTrainedModel, layer: int, hidden: torch.Tensor, mask: torch.Tensor,
           prefix: torch.Tensor) -> torch.Tensor:
    attention = _attention_modules(model)[layer]
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    batch, seq_len, _ = hidden.shape
    query, key, value = (
        _heads(attention.get_submodule(name)(hidden), head_dim) for name in ("q_proj", "k_proj", "v_proj")
    )  # (B, H | kv_heads, T, D)
    positions = torch.arange(P, P + seq_len)[None].expand(batch, -1)  # real tokens after the prefix
    cos, sin = model.get_submodule("model.language_model.rotary_emb")(hidden, positions)  # (B, T, D) each
    query, key = _rope(query, cos, sin), _rope(key, cos, sin)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()  # (T, T)
    merged = _attend(query, key, value, prefix, _bidirectional(mask, seq_len) & causal, head_dim**-0.5)
    return attention.get_submodule("o_proj")(merged)


_BERT_NAMES = ("query", "key", "value", None)  # BertSelfAttention returns the merged heads
_VIT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_BY_HAND: dict[str, Callable[..., torch.Tensor]] = {
    "bert": _projected(_BERT_NAMES),
    "roberta": _projected(_BERT_NAMES),
    "xlm-roberta": _projected(_BERT_NAMES),
    "electra": _projected(_BERT_NAMES),
    "distilbert": _projected(("q_lin", "k_lin", "v_lin", "out_lin")),
    "modernbert": _modernbert,
    "vit": _projected(_VIT_NAMES),
    "deit": _projected(_VIT_NAMES),
    "dinov2": _projected(_VIT_NAMES),
    LLAVA: _llava,
}
ATTENTION_CLASSES = {
    "bert": "BertSelfAttention", "roberta": "RobertaSelfAttention", "xlm-roberta": "XLMRobertaSelfAttention",
    "electra": "ElectraSelfAttention", "distilbert": "DistilBertSelfAttention", "modernbert": "ModernBertAttention",
    "vit": "ViTAttention", "deit": "DeiTAttention", "dinov2": "Dinov2Attention", LLAVA: "LlamaAttention",
}


def _attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The family's attention modules in layer order (found by class name, not through our adapters)."""
    name = ATTENTION_CLASSES[model.config.model_type]
    return [module for module in model.modules() if type(module).__name__ == name]


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("attn_implementation", BACKENDS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_attention_layer_matches_hand_written_attention(family: str, attn_implementation: str, layer: int) -> None:
    """Oracle: the layer recomputed by hand from its captured input, with the prefix keys/values
    in front and padded keys hidden; compared at real tokens within 1e-5."""
    model = build(family, attn_implementation, MODEL_SEED)
    inputs = _inputs(family)
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["output"] = output[0]

    hook = _attention_modules(model)[layer].register_forward_hook(capture, with_kwargs=True)
    try:
        with prefixed(model) as handle, torch.no_grad():
            model(**inputs)
            prefix = handle.layer_prefixes()[layer]  # (2, kv_heads, P, D)
            mask = inputs.get("attention_mask", torch.ones(captured["hidden"].shape[:2], dtype=torch.long))
            expected = ATTENTION_BY_HAND[family](model, layer, captured["hidden"], mask, prefix)
    finally:
        hook.remove()
    assert captured["output"].shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(captured["output"][real], expected[real], atol=ATOL, rtol=0)


# --- c) a padded row equals the row alone ------------------------------------------------------


def _padding_cases() -> list[tuple[str, str, str]]:
    cases = [(family, backend, "right") for family in (*TEXT_FAMILIES, LLAVA) for backend in BACKENDS]
    cases += [(family, backend, "left") for family in POSITION_PAD_AWARE for backend in BACKENDS]
    return cases


def _hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    return output.hidden_states[-1]  # (B, T, hidden)


@pytest.mark.parametrize(("family", "attn_implementation", "padding"), _padding_cases())
def test_padded_row_equals_row_alone(family: str, attn_implementation: str, padding: str) -> None:
    """Oracle: the padded row run alone without its padding; every real token's last hidden
    state (and, for right-padded classifiers, the logits) agree within 1e-5. Classifiers read
    the first token, which left padding makes a pad: their logits are compared right-padded."""
    model = build(family, attn_implementation, MODEL_SEED)
    inputs = llava_batch(2, BATCH_SEED) if family == LLAVA else _inputs(family, padding)
    if family == LLAVA:  # right-pad row 1 by two tokens (after the image placeholders)
        inputs["attention_mask"][1, -2:] = 0
        inputs["input_ids"][1, -2:] = 0
    real = inputs["attention_mask"][1].bool()
    alone = {
        name: (value[1:2, real] if name in ("input_ids", "attention_mask") else value[1:2])
        for name, value in inputs.items()
    }
    with prefixed(model):
        batched_hidden, alone_hidden = _hidden(model, inputs), _hidden(model, alone)
        torch.testing.assert_close(batched_hidden[1, real], alone_hidden[0], atol=ATOL, rtol=0)
        if family != LLAVA and padding == "right":
            torch.testing.assert_close(_logits(model, inputs)[1], _logits(model, alone)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_image_in_a_batch_equals_image_alone(family: str) -> None:
    model = build(family, "sdpa", MODEL_SEED)
    pixel_values = example_inputs(family, 3, BATCH_SEED)["pixel_values"]
    with prefixed(model):
        batched = _logits(model, {"pixel_values": pixel_values})
        alone = _logits(model, {"pixel_values": pixel_values[1:2]})
    torch.testing.assert_close(batched[1:2], alone, atol=ATOL, rtol=0)


# --- d) eager and sdpa agree -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eager_matches_sdpa(family: str) -> None:
    inputs = _inputs(family)
    results = []
    for attn_implementation in BACKENDS:
        model = build(family, attn_implementation, MODEL_SEED)
        with prefixed(model):
            results.append(_hidden(model, inputs))
    real = inputs.get("attention_mask", torch.ones(results[0].shape[:2], dtype=torch.long)).bool()
    torch.testing.assert_close(results[0][real], results[1][real], atol=ATOL, rtol=0)


# --- e) positions: real tokens sit behind the prefix, as PEFT places them ----------------------------


def _positions_by_hand(family: str, inputs: dict[str, torch.Tensor], pad: int) -> torch.Tensor:
    """PEFT's positions (its prefix is a cache of length P): BERT-style ``P..P+T-1``;
    RoBERTa-style ``pad + P + 1, ...`` over real tokens, ``pad`` at padding."""
    input_ids = inputs["input_ids"]
    batch, seq_len = input_ids.shape
    if family in POSITION_PAD_AWARE:
        positions = torch.full_like(input_ids, pad)
        for row in range(batch):
            real = input_ids[row] != pad
            positions[row, real] = pad + P + torch.arange(1, int(real.sum()) + 1)
        return positions
    return torch.arange(P, P + seq_len)[None].expand(batch, -1)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
def test_real_tokens_sit_after_the_prefix(family: str) -> None:
    """Oracle: the embeddings module called by hand with explicit positions."""
    model = build(family, "sdpa", MODEL_SEED)
    inputs = _inputs(family, "left" if family in POSITION_PAD_AWARE else "right")
    embeddings = model.base_model.get_submodule("embeddings")
    captured: list[torch.Tensor] = []
    hook = embeddings.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with prefixed(model), torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    positions = _positions_by_hand(family, inputs, model.config.pad_token_id)
    with torch.no_grad():
        expected = embeddings(input_ids=inputs["input_ids"], position_ids=positions)
    torch.testing.assert_close(captured[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", POSITION_PAD_AWARE)
def test_embeddings_input_gets_the_same_positions_as_ids(family: str) -> None:
    """Without ``input_ids`` RoBERTa counts every token as real; the offset must shift those
    positions too, so an unpadded row gives the same output from ids and from embeddings."""
    model = build(family, "sdpa", MODEL_SEED)
    inputs = _inputs(family, "none")
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # (B, T, hidden)
    with prefixed(model):
        from_ids = _logits(model, inputs)
        from_embeds = _logits(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    torch.testing.assert_close(from_embeds, from_ids, atol=ATOL, rtol=0)


def test_offset_past_the_position_table_is_refused() -> None:
    model = build("bert", "sdpa", MODEL_SEED)
    inputs = text_batch("bert", 1, BATCH_SEED, length=model.config.max_position_embeddings - 2)
    with prefixed(model), pytest.raises(ValueError) as error:
        model(**inputs)
    message = str(error.value)
    assert "max_position_embeddings=64" in message and "position_offset=0" in message, message
    with prefixed(model, position_offset=0):
        model(**inputs)  # fits without the offset


def test_explicit_position_offset_zero_keeps_the_model_positions() -> None:
    model = build("bert", "sdpa", MODEL_SEED)
    inputs = _inputs("bert")
    with prefixed(model, position_offset=0):
        zero = _logits(model, inputs)
        explicit = _logits(model, {**inputs, "position_ids": torch.arange(inputs["input_ids"].shape[1])[None]})
    with prefixed(model):
        default = _logits(model, inputs)
    torch.testing.assert_close(zero, explicit, atol=0, rtol=0)
    assert (zero - default).abs().max() > 1e-4


# --- f) refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_vision_position_offset_is_refused(family: str) -> None:
    model = build(family, "sdpa", MODEL_SEED)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, position_offset=2))
    message = str(error.value)
    assert "position_offset=2" in message and family in message and "position inputs" in message, message
    assert_untouched(model, before)
    with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, position_offset=0)):
        pass


@pytest.mark.parametrize("overrides", [{"is_decoder": True}, {"add_cross_attention": True, "is_decoder": True}])
def test_bert_as_decoder_is_refused(overrides: dict[str, bool]) -> None:
    model = build_head("bert", "features", "sdpa", MODEL_SEED, **overrides)
    before = snapshot(model)
    with pytest.raises(ValueError, match="bidirectional encoder") as error:
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    assert "is_decoder=True" in str(error.value)
    assert_untouched(model, before)


# --- g) detach leaves no trace ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_detach_leaves_no_trace(family: str) -> None:
    """snapshot/assert_untouched from the lifecycle tests, around attach, forward, backward, detach."""
    model = build(family, "sdpa", MODEL_SEED)
    inputs = _inputs(family)
    with torch.no_grad():  # transformers installs its output-capturing hooks lazily: warm them up
        model(**inputs, output_attentions=True, output_hidden_states=True)
    before = snapshot(model)
    base = _logits(model, inputs)
    with prefixed(model) as handle:
        model(**inputs).logits.sum().backward()
        assert handle.encoder.embedding.weight.grad is not None
        assert handle.encoder.embedding.weight.grad.abs().sum() > 0
    assert_untouched(model, before)
    torch.testing.assert_close(_logits(model, inputs), base, atol=0, rtol=0)


# --- h) llava: the prefix reaches the language model only ------------------------------------------


def test_llava_prefix_reaches_the_language_model_only() -> None:
    model = build(LLAVA, "sdpa", MODEL_SEED)
    inputs = llava_batch(2, BATCH_SEED)
    vision_outputs: list[torch.Tensor] = []
    hook = model.get_submodule("model.vision_tower").register_forward_hook(
        lambda module, args, output: vision_outputs.append(output.last_hidden_state)
    )
    try:
        base = _logits(model, inputs)
        with prefixed(model) as handle:
            ours = _logits(model, inputs)
    finally:
        hook.remove()
    text = model.config.text_config
    assert handle.config.num_layers == text.num_hidden_layers
    assert handle.config.num_attention_heads == text.num_key_value_heads
    torch.testing.assert_close(vision_outputs[0], vision_outputs[1], atol=0, rtol=0)  # vision tower untouched
    assert (ours - base).abs().max() > 1e-3


def test_llava_generation_with_and_without_cache_agree() -> None:
    """Oracle: the same model without cache (every step recomputes the whole sequence);
    the first new token is also the argmax of a plain forward's last logits."""
    model = build(LLAVA, "sdpa", MODEL_SEED)
    inputs = llava_batch(1, BATCH_SEED)
    # a generated image placeholder would ask the uncached steps for a second image
    settings: dict[str, Any] = {
        "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "suppress_tokens": [IMAGE_TOKEN],
    }
    with prefixed(model), torch.no_grad():
        generate: Callable[..., torch.Tensor] = model.generate  # type: ignore[assignment]
        cached = generate(**inputs, use_cache=True, **settings)
        uncached = generate(**inputs, use_cache=False, **settings)
        first = model(**inputs).logits[:, -1, :IMAGE_TOKEN].argmax(-1)  # IMAGE_TOKEN is the last id
    new_tokens = cached[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] == 4
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
    assert int(new_tokens[0, 0]) == int(first[0])


# --- i) training: gradient checkpointing recomputes with the same prefix ------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "vit"])
def test_gradient_checkpointing_gives_the_same_prefix_gradient(family: str, use_reentrant: bool) -> None:
    """Oracle: the same training step without checkpointing (dropout is 0 in the tiny configs).

    Reentrant checkpointing only backpropagates into a layer whose inputs require grad;
    transformers arranges that (``enable_input_require_grads``) only for models whose main
    input is ``input_ids``, so a vision model needs the call by hand, as under PEFT."""
    inputs = _inputs(family)
    gradients = []
    for checkpointing in (False, True):
        model = build(family, "sdpa", MODEL_SEED).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if family in VISION_FAMILIES and use_reentrant:
                model.enable_input_require_grads()
        with prefixed(model) as handle:
            model(**inputs).logits.square().sum().backward()
            gradient = handle.encoder.embedding.weight.grad
            assert gradient is not None
            gradients.append(gradient.clone())
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[1], gradients[0], atol=ATOL, rtol=0)
