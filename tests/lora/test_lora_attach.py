"""Merging, baking, several named adapters and per-row adapter selection.

Oracles: the unmerged model (merging must not change the logits), the original
``state_dict()`` bits (detach after merge), ``W + scaling * B @ A`` computed here from the
adapter's own tensors (bake), and each adapter attached alone (switching, disabling,
detaching in either order, mixed-adapter batches, generation).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_encoders import attach_random_prefix, text_batch
from tiny_encoders import build as build_encoder
from tiny_lora import CASES, randomise, run
from tiny_models import build_model, random_batch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prefix_hooks.lora import (
    LoraAttachment,
    LoraConfig,
    ModulesToSaveWrapper,
    active_adapters,
    adapter_rows,
    attach_lora,
    set_active_adapters,
)
from prefix_hooks.lora.layers import LoraLayer

ATOL = 1e-5
MERGE_CASES = ["llama", "gpt2-conv1d", "llama-embedding", "conv2d", "bert-seq-cls", "vit-image-cls"]
CONFIG_A = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
CONFIG_B = LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "o_proj", "embed_tokens"])
MAX_NEW_TOKENS = 4


def handle_for(case_id: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, LoraAttachment, dict[str, Any]]:
    case = CASES[case_id]
    model = case.build().to(dtype)
    handle = attach_lora(model, LoraConfig(**case.fields))
    randomise(handle)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs().items()}
    return model, handle, inputs


def state_bits(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    return {
        key: (t.dtype, tuple(t.shape), t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        for key, t in model.state_dict().items()
    }


def module_ids(model: nn.Module) -> dict[str, int]:
    return {name: id(module) for name, module in model.named_modules()}


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight


def linear_delta(handle: LoraAttachment, target: str) -> torch.Tensor:
    """``scaling * B @ A`` of ``target`` (an nn.Linear), from the handle's tensors: ``(out, in)``."""
    params = dict(handle.named_parameters())
    a = params[f"{target}.lora_A.{handle.adapter_name}.weight"]  # (r, in)
    b = params[f"{target}.lora_B.{handle.adapter_name}.weight"]  # (out, r)
    rank, alpha = handle.config.rank_and_alpha(target)
    return (b @ a).detach() * (alpha / rank)


# --- merging ---------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", MERGE_CASES)
def test_merged_logits_equal_unmerged(case_id: str) -> None:
    model, handle, inputs = handle_for(case_id)
    base = run(model, inputs)
    with handle:
        unmerged = run(model, inputs)
        handle.merge()
        assert handle.is_merged
        merged = run(model, inputs)
        handle.merge()  # merging twice changes nothing
        assert torch.equal(run(model, inputs), merged)
        handle.unmerge()
        assert not handle.is_merged
        again = run(model, inputs)
    assert (unmerged - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    assert torch.equal(again, unmerged)


def test_merge_writes_w_plus_scaled_b_a_into_the_original_weight() -> None:
    model, handle, _ = handle_for("llama")
    target = handle.target_names[0]
    weight = weight_of(model, target)
    original = weight.detach().clone()
    with handle:
        handle.merge()
        assert weight_of(model, f"{target}.base_layer") is weight  # in place: the same tensor
        torch.testing.assert_close(weight.detach(), original + linear_delta(handle, target), atol=1e-6, rtol=0)
    assert torch.equal(weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case_id", ["llama", "gpt2-conv1d", "llama-embedding", "conv2d", "bert-seq-cls"])
def test_merge_then_detach_restores_the_state_dict_bit_for_bit(case_id: str, dtype: torch.dtype) -> None:
    model, handle, inputs = handle_for(case_id, dtype)
    before, modules = state_bits(model), module_ids(model)
    originals = {t: weight_of(model, t).detach().clone() for t in handle.target_names}
    with handle:
        handle.merge()
        merged = run(model, inputs)
        handle.unmerge()
        handle.merge()
        changed = [t for t in originals if not torch.equal(weight_of(model, t), originals[t])]
        assert changed == list(originals)  # every merged weight differs from the original ...
        assert torch.equal(run(model, inputs), merged)
    assert state_bits(model) == before  # ... and come back exactly
    assert module_ids(model) == modules


def test_merge_needs_an_attached_active_adapter() -> None:
    model, handle, _ = handle_for("llama")
    with pytest.raises(RuntimeError, match="not attached"):
        handle.merge()
    with handle:
        set_active_adapters(model, [])
        with pytest.raises(RuntimeError, match="not active"):
            handle.merge()
        handle.activate()
        handle.merge()
        with pytest.raises(RuntimeError, match="merged"), handle.disabled():
            pass
        with pytest.raises(RuntimeError, match="merged"):
            set_active_adapters(model, [])
        with pytest.raises(ValueError, match="merged"), adapter_rows(model, ["default", "default"]):
            run(model, random_batch(2, 4))


# --- bake ------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["llama", "gpt2-conv1d", "bert-seq-cls", "llama-embedding"])
def test_bake_keeps_the_merged_weights_and_no_lora_module(case_id: str) -> None:
    model, handle, inputs = handle_for(case_id)
    keys, modules = list(model.state_dict()), module_ids(model)
    base = run(model, inputs)
    with handle:
        unmerged = run(model, inputs)
        handle.merge()
        merged = run(model, inputs)
    copies = {name: handle_param.detach().clone() for name, handle_param in handle.named_parameters()
              if ".modules_to_save." in name}
    handle.bake()
    assert not handle.is_attached
    assert list(model.state_dict()) == keys
    assert module_ids(model) == modules
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules())
    baked = run(model, inputs)
    assert torch.equal(baked, merged)
    torch.testing.assert_close(baked, unmerged, atol=ATOL, rtol=0)
    assert (baked - base).abs().max() > 1e-3
    state = model.state_dict()
    for name, value in copies.items():  # the original head now holds the trained copy's values
        assert torch.equal(state[name.replace(".modules_to_save.default", "")], value)


def test_bake_adds_scaled_b_a_to_each_linear_target() -> None:
    model, handle, _ = handle_for("llama")
    originals = {t: weight_of(model, t).detach().clone() for t in handle.target_names}
    handle.bake()
    for target, original in originals.items():
        expected = original + linear_delta(handle, target)
        torch.testing.assert_close(weight_of(model, target).detach(), expected, atol=1e-6, rtol=0)


def test_bake_keeps_another_attached_adapter_working() -> None:
    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    a, b = attach_lora(model, CONFIG_A, "a"), attach_lora(model, CONFIG_B, "b")
    randomise(a, seed=1)
    randomise(b, seed=2)
    with a:
        alone_a = run(model, inputs)
    a.attach()
    b.attach()
    both = run(model, inputs)
    b.merge()
    a.bake()  # shares v_proj with the merged b
    assert not a.is_attached
    torch.testing.assert_close(run(model, inputs), both, atol=ATOL, rtol=0)
    b.unmerge()
    torch.testing.assert_close(run(model, inputs), both, atol=ATOL, rtol=0)
    b.detach()
    torch.testing.assert_close(run(model, inputs), alone_a, atol=ATOL, rtol=0)  # b is gone, a stays baked in
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_unmerging_one_adapter_keeps_the_other_merged() -> None:
    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    a, b = attach_lora(model, CONFIG_A, "a"), attach_lora(model, CONFIG_B, "b")
    randomise(a, seed=1)
    randomise(b, seed=2)
    v_proj = "model.layers.0.self_attn.v_proj"  # targeted by both
    original = weight_of(model, v_proj).detach().clone()
    with a, b:
        both = run(model, inputs)
        a.merge()
        b.merge()
        a.unmerge()
        assert (a.is_merged, b.is_merged) == (False, True)
        torch.testing.assert_close(run(model, inputs), both, atol=ATOL, rtol=0)
        torch.testing.assert_close(  # b's delta only
            weight_of(model, f"{v_proj}.base_layer").detach(), original + linear_delta(b, v_proj), atol=1e-6, rtol=0
        )
    assert torch.equal(weight_of(model, v_proj), original)


# --- several adapters ---------------------------------------------------------------------
def two_adapters(model: nn.Module) -> tuple[LoraAttachment, LoraAttachment]:
    a, b = attach_lora(model, CONFIG_A, "a"), attach_lora(model, CONFIG_B, "b")
    randomise(a, seed=1)
    randomise(b, seed=2)
    return a, b


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_adapters_switch_disable_and_detach_in_either_order(first: str) -> None:
    model = build_model("llama")
    warm_up(model)
    inputs = random_batch(2, 6, seed=1, left_pad=[0, 2])
    a, b = two_adapters(model)
    base = run(model, inputs)
    with a:
        alone_a = run(model, inputs)
    with b:
        alone_b = run(model, inputs)
    before = snapshot(model)
    a.attach()
    b.attach()
    assert active_adapters(model) == ["a", "b"]
    both = run(model, inputs)
    assert (both - alone_a).abs().max() > 1e-3 and (both - alone_b).abs().max() > 1e-3
    a.activate()
    torch.testing.assert_close(run(model, inputs), alone_a, atol=ATOL, rtol=0)
    b.activate()
    torch.testing.assert_close(run(model, inputs), alone_b, atol=ATOL, rtol=0)
    set_active_adapters(model, [])
    assert torch.equal(run(model, inputs), base)
    set_active_adapters(model, ["a", "b"])
    torch.testing.assert_close(run(model, inputs), both, atol=ATOL, rtol=0)
    with a.disabled():
        assert not a.is_enabled
        torch.testing.assert_close(run(model, inputs), alone_b, atol=ATOL, rtol=0)
        with b.disabled():
            assert torch.equal(run(model, inputs), base)
    torch.testing.assert_close(run(model, inputs), both, atol=ATOL, rtol=0)
    leaving, staying, staying_alone = (a, b, alone_b) if first == "a" else (b, a, alone_a)
    leaving.detach()
    torch.testing.assert_close(run(model, inputs), staying_alone, atol=ATOL, rtol=0)
    assert active_adapters(model) == [staying.adapter_name]
    staying.detach()
    assert_untouched(model, before)


def test_adapter_names_must_differ() -> None:
    model = build_model("llama")
    first, second = attach_lora(model, CONFIG_A), attach_lora(model, CONFIG_B)
    with first:
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="already attached"):
            second.attach()
        assert_untouched(model, before)


def test_a_handle_built_while_others_are_attached_sees_the_bare_model() -> None:
    model = build_model("llama")
    config = LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"])
    expected = attach_lora(model, config)
    prefix = attach_random_prefix(model, 2, prefix_projection=True)  # its encoder has Linear layers
    with attach_lora(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]), "first"), prefix:
        built = attach_lora(model, config, "second")
    assert built.target_names == expected.target_names
    assert built.modules_to_save_names == expected.modules_to_save_names == ["lm_head"]
    assert all(t.place.original is model.get_submodule(t.place.name) for t in built._targets)


def test_set_active_adapters_rejects_unknown_names() -> None:
    model = build_model("llama")
    a, _ = two_adapters(model)
    with pytest.raises(ValueError, match="no LoRA adapter is attached"):
        set_active_adapters(model, ["a"])
    with a:
        with pytest.raises(ValueError, match=r"\['b'\] are not LoRA adapters attached"):
            set_active_adapters(model, ["a", "b"])
        with pytest.raises(TypeError, match="string"):
            set_active_adapters(model, "a")


# --- per-row selection ------------------------------------------------------------------
@pytest.mark.parametrize("via", ["context", "keyword"])
def test_mixed_adapter_rows_equal_each_row_with_its_adapter_alone(via: str) -> None:
    model = build_model("llama")
    inputs = random_batch(4, 6, seed=1, left_pad=[0, 2, 1, 0])
    a, b = two_adapters(model)
    base = run(model, inputs)
    with a:
        alone_a = run(model, inputs)
    with b:
        alone_b = run(model, inputs)
    names = ["a", "__base__", "b", "a"]
    expected = torch.stack([alone_a[0], base[1], alone_b[2], alone_a[3]])
    with a, b:
        if via == "context":
            with adapter_rows(model, names):
                mixed = run(model, inputs)
        else:
            with torch.no_grad():
                mixed = model(**inputs, adapter_names=names).logits
        unselected = run(model, inputs)  # the selection ends with the block / the call
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)
    assert (unselected - expected).abs().max() > 1e-3


def test_mixed_rows_run_each_adapters_modules_to_save_copy() -> None:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = build_encoder("bert")
    inputs = text_batch("bert", batch=4, seed=2, right_pad=[0, 2, 0, 1])
    a, b = attach_lora(model, config, "a"), attach_lora(model, config, "b")
    randomise(a, seed=1)
    randomise(b, seed=2)
    base = run(model, inputs)
    with a:
        alone_a = run(model, inputs)
    with b:
        alone_b = run(model, inputs)
    with a, b:
        with pytest.raises(RuntimeError, match="each have a trainable copy"):
            run(model, inputs)  # which classifier copy? ambiguous while both are active
        mixed = model(**inputs, adapter_names=["a", "b", "__base__", "a"]).logits.detach()  # a's rows apart
        a.activate()
        torch.testing.assert_close(run(model, inputs), alone_a, atol=ATOL, rtol=0)
    expected = torch.stack([alone_a[0], alone_b[1], base[2], alone_a[3]])
    torch.testing.assert_close(mixed, expected, atol=ATOL, rtol=0)


def test_adapter_rows_reject_bad_names_before_the_forward() -> None:
    model = build_model("llama")
    a, _ = two_adapters(model)
    inputs = random_batch(2, 4)
    with a:
        with pytest.raises(ValueError, match=r"\['b'\] are not LoRA adapters attached"):
            model(**inputs, adapter_names=["a", "b"])
        with pytest.raises(ValueError, match=r"\['c'\] are not LoRA adapters attached"), adapter_rows(model, ["c", "a"]):
            pass
        with pytest.raises(ValueError, match="3 rows"), adapter_rows(model, ["a", "a", "a"]):
            run(model, inputs)
        with pytest.raises(TypeError, match="list or tuple"):
            model(**inputs, adapter_names="a")
        torch.testing.assert_close(run(model, inputs), run(model, inputs))  # nothing stuck after the errors
        with adapter_rows(model, ["__base__", "__base__"]):
            base_rows = run(model, inputs)
    assert torch.equal(base_rows, run(model, inputs))


def test_generate_selects_rows_through_adapter_rows() -> None:
    model = build_model("llama")
    prompt = random_batch(2, 5, seed=3)
    a, b = two_adapters(model)
    settings: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    with a:
        tokens_a = model.generate(**prompt, **settings)  # type: ignore[operator]
    with b:
        tokens_b = model.generate(**prompt, **settings)  # type: ignore[operator]
    assert not torch.equal(tokens_a, tokens_b)
    with a, b:
        with adapter_rows(model, ["a", "b"]):
            mixed = model.generate(**prompt, **settings)  # type: ignore[operator]
        with pytest.raises(ValueError, match="adapter_names"):
            model.generate(**prompt, adapter_names=["a", "b"], **settings)  # type: ignore[operator]  # validated kwargs
    assert torch.equal(mixed, torch.stack([tokens_a[0], tokens_b[1]]))


# --- a 7B-sized skeleton on the meta device ---------------------------------------------------
def test_attach_every_linear_of_a_32_layer_4096_wide_meta_skeleton() -> None:
    config = AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = module_ids(model)
    start = time.perf_counter()
    handle = attach_lora(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    handle.attach()
    elapsed = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 32 * 7
    assert all(p.device.type == "meta" for p in handle.parameters())
    assert handle.num_trainable_parameters() == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    handle.detach()
    assert module_ids(model) == modules
    print(f"attach_lora on the meta skeleton: {elapsed * 1e3:.0f} ms (build + attach)")
