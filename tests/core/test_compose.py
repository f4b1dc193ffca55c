"""``attach(model, *configs)``: several methods as one handle, all or nothing."""

from __future__ import annotations

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_models import build_model, random_batch

from prefix_hooks import LoraConfig, PrefixTuningConfig, attach, attach_lora, attach_prefix
from prefix_hooks.core.compose import MultiAttachment


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _randomise(handle: object) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in handle.parameters():  # type: ignore[attr-defined]
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def test_attach_one_config_equals_the_method_alone() -> None:
    model = build_model("llama")
    batch = random_batch(2, 6, seed=1, left_pad=[0, 2])
    config = PrefixTuningConfig(num_virtual_tokens=4)
    alone = attach_prefix(model, config)
    _randomise(alone)
    with alone:
        want = _logits(model, batch)
    grouped = attach(model, alone)
    with grouped as handle:
        assert isinstance(handle, MultiAttachment)
        got = _logits(model, batch)
        with handle.disabled():
            base = _logits(model, batch)
        assert handle.num_trainable_parameters() == alone.num_trainable_parameters()
    assert torch.equal(got, want)
    torch.testing.assert_close(base, _logits(model, batch), atol=0, rtol=0)


def test_a_part_failing_to_attach_detaches_the_others() -> None:
    """The second prefix refuses to stack: the first must come off again, leaving no trace."""
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    first = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2), adapter_name="one")
    second = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3), adapter_name="two")
    with pytest.raises(RuntimeError, match="prefixes do not stack"):
        attach(model, first, second).attach()
    assert not first.is_attached and not second.is_attached
    assert_untouched(model, before)


def test_bad_config_raises_before_anything_is_attached() -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="num_layers=5"):
        attach(model, PrefixTuningConfig(num_virtual_tokens=2, num_layers=5))
    with pytest.raises(TypeError, match="cannot attach a dict"):
        attach(model, {"r": 8})
    with pytest.raises(ValueError, match="at least one"):
        attach(model)
    assert_untouched(model, before)


def test_handles_must_belong_to_the_model() -> None:
    model, other = build_model("llama"), build_model("llama")
    handle = attach_prefix(other, PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="another model"):
        attach(model, handle)
    with pytest.raises(ValueError, match="twice"):
        attach(other, handle, handle)


def test_detach_restores_everything() -> None:
    model = build_model("gpt2")
    warm_up(model)
    before = snapshot(model)
    with attach(model, PrefixTuningConfig(num_virtual_tokens=2)) as handle:
        assert handle.parts[0].is_attached
        model(**random_batch(1, 4)).logits.sum().backward()
    assert not handle.parts[0].is_attached
    assert_untouched(model, before)


def test_prefix_and_lora_in_one_block() -> None:
    """Both parts train, and together they compute the prefix over the LoRA-merged weights.

    Oracle: a second copy of the model whose LoRA is baked into its weights, with only the
    same prefix attached."""
    model, oracle = build_model("llama", seed=0), build_model("llama", seed=0)
    batch = random_batch(2, 6, seed=1, left_pad=[0, 2])
    prefix_config = PrefixTuningConfig(num_virtual_tokens=3)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    grouped = attach(model, prefix_config, lora_config)
    prefix_part, lora_part = grouped.parts
    _randomise(prefix_part)
    _randomise(lora_part)
    with grouped:
        got = _logits(model, batch)
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in prefix_part.parameters())
    assert all(p.grad is not None for p in lora_part.parameters())
    assert trainable == {id(p) for p in [*prefix_part.parameters(), *lora_part.parameters()]}

    oracle_lora = attach_lora(oracle, lora_config)
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(oracle_lora.named_parameters(), lora_part.named_parameters(), strict=True):
            mine.copy_(theirs)
    oracle_lora.attach()
    oracle_lora.bake()
    oracle_prefix = attach_prefix(oracle, prefix_config)
    oracle_prefix.encoder.load_state_dict(prefix_part.encoder.state_dict())  # type: ignore[attr-defined]
    with oracle_prefix:
        want = _logits(oracle, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_prefix_attached_later_keeps_lora_biases_trainable() -> None:
    model = build_model("gpt2")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with attach_lora(model, LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only")) as lora:
        biases = lora.trained_base_parameters()
        assert biases and all(bias.requires_grad for bias in biases)
        with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2)):
            assert all(bias.requires_grad for bias in biases)
        assert all(bias.requires_grad for bias in biases)
    assert lora.trained_base_parameters() == []
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
