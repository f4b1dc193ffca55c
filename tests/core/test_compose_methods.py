"""Methods combined in one ``attach(model, ...)`` block, each checked against an oracle that
does not use the second method's hooks: IA3 folded into the weights by hand, a prompt put in
front of ``inputs_embeds`` by hand. Combinations that cannot work must say so before any change."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from prefix_hooks import (
    IA3Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)

P = 4
ATOL = 1e-5


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _randomise(handle: object, seed: int, around: float = 0.0, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():  # type: ignore[attr-defined]
            parameter.copy_(around + scale * torch.randn(parameter.shape, generator=generator))


def _fold_ia3_by_hand(model: nn.Module, ia3: IA3Attachment) -> None:
    """Scale the weights of ``model`` (a copy without adapters) as ``ia3``'s vectors say:
    a target's output features (weight and bias), or a feed-forward target's input features.

    ``nn.Linear`` weights are ``(out, in)``, transformers' ``Conv1D`` weights ``(in, out)``.
    """
    with torch.no_grad():
        for target, vector in zip(ia3.targets, ia3.parameters(), strict=True):
            module = model.get_submodule(target.name)
            scale = vector.flatten()  # (in,) for feed-forward targets, else (out,)
            if isinstance(module, nn.Linear):
                module.weight.mul_(scale[None, :] if target.feedforward else scale[:, None])
            else:
                assert isinstance(module, Conv1D), f"{target.name} is a {type(module).__name__}"
                module.weight.mul_(scale[:, None] if target.feedforward else scale[None, :])
            if not target.feedforward and module.bias is not None:
                module.bias.mul_(scale)


def _ia3(model: nn.Module) -> IA3Attachment:
    handle = attach_ia3(model, IA3Config())
    _randomise(handle, seed=5, around=1.0, scale=0.3)
    return handle


def _prompt_in_front(model: PreTrainedModel, prompt: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the real positions of ``model`` run on ``[prompt; embed(input_ids)]`` by hand."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, L) each
    embeds = model.get_input_embeddings()(input_ids)  # (B, L, d)
    batch_size = input_ids.shape[0]
    virtual = prompt[None].expand(batch_size, -1, -1).to(embeds.dtype)  # (B, P, d)
    full_mask = torch.cat([mask.new_ones(batch_size, prompt.shape[0]), mask], dim=1)  # (B, P + L)
    with torch.no_grad():
        logits = model(inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=full_mask).logits
    return logits[:, prompt.shape[0] :]  # (B, L, V)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_and_ia3_equal_the_prefix_on_hand_scaled_weights(family: str) -> None:
    model = build_model(family)
    oracle_model = copy.deepcopy(model)
    batch = random_batch(2, 7, seed=1, left_pad=[0, 2])
    ia3 = _ia3(model)  # gpt2: Conv1D c_attn and mlp.c_proj (feed-forward)
    prefix = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    _randomise(prefix, seed=6)
    before = snapshot(model)
    with attach(model, prefix, ia3):
        got = _logits(model, batch)
    assert_untouched(model, before)

    _fold_ia3_by_hand(oracle_model, ia3)
    oracle_prefix = attach_prefix(oracle_model, PrefixTuningConfig(num_virtual_tokens=P))
    oracle_prefix.encoder.load_state_dict(prefix.encoder.state_dict())
    with oracle_prefix:
        want = _logits(oracle_model, batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with prefix:
        prefix_only = _logits(model, batch)
    assert (got - prefix_only).abs().max() > 1e-3  # the IA3 part does something


def test_lora_and_ia3_equal_lora_on_hand_scaled_weights() -> None:
    """IA3 scales the original module inside a LoRA layer, whichever is attached first."""
    model = build_model("llama")
    oracle_model = copy.deepcopy(model)
    batch = random_batch(2, 7, seed=2, left_pad=[1, 0])
    lora = attach_lora(model, LoraConfig(r=4, target_modules=["v_proj", "o_proj"]))
    _randomise(lora, seed=7, scale=0.2)
    ia3 = _ia3(model)  # k_proj, v_proj, down_proj: v_proj is shared with LoRA
    results = []
    for order in ((lora, ia3), (ia3, lora)):
        before = snapshot(model)
        with attach(model, *order):
            results.append(_logits(model, batch))
        assert_untouched(model, before)
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)

    _fold_ia3_by_hand(oracle_model, ia3)
    oracle_lora = attach_lora(oracle_model, LoraConfig(r=4, target_modules=["v_proj", "o_proj"]))
    for (name, ours), (_, theirs) in zip(
        sorted(lora.named_parameters()), sorted(oracle_lora.named_parameters()), strict=True
    ):
        with torch.no_grad():
            theirs.copy_(ours)
    with oracle_lora:
        want = _logits(oracle_model, batch)
    torch.testing.assert_close(results[0], want, atol=ATOL, rtol=0)


# PEFT's layout: the hand-made oracle puts the prompt in front of the left padding
@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=P, virtual_token_placement="peft"),
                                    PromptEncoderConfig(num_virtual_tokens=P, virtual_token_placement="peft")],
                         ids=["prompt-tuning", "p-tuning"])
def test_prompt_and_lora_equal_lora_on_a_hand_made_prompt(config: PromptTuningConfig | PromptEncoderConfig) -> None:
    model = build_model("llama")
    batch = random_batch(2, 6, seed=3, left_pad=[0, 2])
    warm_up(model)
    before = snapshot(model)
    lora = attach_lora(model, LoraConfig(r=4))
    _randomise(lora, seed=8, scale=0.2)
    prompt = attach_prompt(model, config)
    with attach(model, prompt, lora) as handle:
        got = _logits(model, batch)  # (B, L, V): the user's length
        with torch.no_grad():
            virtual = prompt.prompt_encoder(torch.arange(P)[None])[0]  # (P, d)
        with handle.disabled():
            base = _logits(model, batch)
    assert_untouched(model, before)
    with lora:
        want = _prompt_in_front(model, virtual, batch)
        lora_only = _logits(model, batch)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - lora_only).abs().max() > 1e-3 and (lora_only - base).abs().max() > 1e-3


def test_prompt_and_ia3_generate_with_cache_as_without() -> None:
    model = build_model("llama")
    batch = random_batch(2, 5, seed=4, left_pad=[0, 1])
    prompt = attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P))
    ia3 = _ia3(model)
    runs: list[Any] = []
    generate: Any = model.generate
    with attach(model, prompt, ia3):
        for use_cache in (True, False):
            out = generate(**batch, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].scores, runs[1].scores, strict=True):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_part_of_a_combination_trains(family: str) -> None:
    model = build_model(family)
    batch = random_batch(2, 6, seed=5)
    lora_config = LoraConfig(r=4) if family == "llama" else LoraConfig(r=4, target_modules=["c_attn"])
    combos = [
        (PromptTuningConfig(num_virtual_tokens=P), lora_config),
        (PrefixTuningConfig(num_virtual_tokens=P), IA3Config()),
        (PromptEncoderConfig(num_virtual_tokens=P), IA3Config(), lora_config),
    ]
    for configs in combos:
        handle = attach(model, *configs)
        with handle:
            model(**batch, labels=batch["input_ids"]).loss.backward()
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            assert trainable == {id(p) for p in handle.parameters()}  # only the adapters train
        for part in handle.parts:
            parameters = list(part.parameters())
            assert parameters and all(id(p) in trainable for p in parameters), type(part).__name__
            assert all(p.grad is not None for p in parameters), type(part).__name__
            # LoRA's A gets no gradient while B is still zero; B (and every other part) must
            assert sum(p.grad.abs().sum() for p in parameters if p.grad is not None) > 0, type(part).__name__
        assert all(p.requires_grad for p in model.parameters())  # the flags as they were before attach


@pytest.mark.parametrize(
    "configs",
    [
        (PromptTuningConfig(num_virtual_tokens=P), PrefixTuningConfig(num_virtual_tokens=P)),
        (PrefixTuningConfig(num_virtual_tokens=P), PromptEncoderConfig(num_virtual_tokens=P)),
        (PromptTuningConfig(num_virtual_tokens=P), PromptEncoderConfig(num_virtual_tokens=P)),
    ],
    ids=["prompt+prefix", "prefix+p-tuning", "prompt+p-tuning"],
)
def test_combinations_that_cannot_work_are_refused_untouched(configs: tuple[object, ...]) -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    handle = attach(model, *configs)
    with pytest.raises(RuntimeError, match="prefix|prompt"):
        handle.attach()
    assert not handle.is_attached
    assert_untouched(model, before)


def test_lora_and_ia3_refuse_to_merge_into_the_same_weight_in_either_order() -> None:
    model = build_model("llama")
    for first_is_lora in (True, False):
        lora = attach_lora(model, LoraConfig(r=4, target_modules=["v_proj"]))
        _randomise(lora, seed=9, scale=0.2)
        ia3 = _ia3(model)
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        with attach(model, lora, ia3):
            first, second = (lora, ia3) if first_is_lora else (ia3, lora)
            first.merge()
            with pytest.raises(RuntimeError, match="unmerge the"):
                second.merge()
            first.unmerge()
        for name, p in model.named_parameters():
            assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("first", ["ia3", "prefix", "prompt"])
def test_lora_builds_while_another_method_trains_a_head_copy(first: str) -> None:
    """A modules-to-save wrapper of another method hides the original head from LoRA's target
    selection, which must see the model as it is without adapters (regression: KeyError)."""
    from tiny_encoders import build_head, text_batch

    model = build_head("bert", "sequence")
    batch = text_batch("bert", batch=2, seed=3)
    factories = {
        "ia3": lambda: attach_ia3(model, IA3Config(task_type="SEQ_CLS"), "first"),
        "prefix": lambda: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"), "first"),
        "prompt": lambda: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"), "first"),
    }
    before = snapshot(model)
    with factories[first]():
        lora = attach_lora(model, LoraConfig(r=2, target_modules=["query", "value"]), "second")
        assert "classifier" not in " ".join(lora.target_names)
        with lora:
            _logits(model, batch)
    assert_untouched(model, before)
