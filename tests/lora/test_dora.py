"""DoRA layers and adapters against independent oracles.

* a hand-written weight-decomposed weight ``W' = m / ||W + s B A||_c * (W + s B A)`` run through
  the base module's own functional form (one per layer type), gradients included, with the
  norm detached as the paper says (and the non-detached gradient shown to differ);
* the initial magnitude is PEFT's for every ``init_lora_weights`` (PEFT's layers, same seed);
* a batch row gets exactly what its adapter gives alone (``adapter_names``);
* merging gives the unmerged outputs at the base model's cost, unmerging and detaching restore
  every bit (float32 and bfloat16, trace snapshot and state-dict hash), ``bake()`` writes ``W'``;
* DoRA where it cannot be (a grouped Conv2d) and bad config values are refused before anything
  changes; bitsandbytes layers match PEFT's DoRA over the same quantised weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_layer
from restoration import assert_untouched, detach_everything, make_warm_model, snapshot, warm_up
from tiny_lora import LAYER_KINDS, TinyConvNet, layer_input, randomise, run, tiny_layer
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks.core.rows import adapter_rows_context
from prefix_hooks.lora import LoraConfig, attach_lora
from prefix_hooks.lora.layers import LoraLayer, wrap_module

__all__ = ["make_warm_model"]  # the fixture, imported for pytest

R, ALPHA = 4, 8
ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]  # Linear and Embedding


def dora_layer(kind: str, dtype: torch.dtype = torch.float32, **adapter: Any) -> LoraLayer:
    """A LoRA layer over :func:`tiny_layer` with a DoRA adapter ``default`` whose factors and magnitude are random."""
    layer = wrap_module(tiny_layer(kind, dtype))
    layer.add_adapter("default", **{"r": R, "alpha": ALPHA, "use_dora": True, **adapter})
    jitter(layer)
    return layer.eval()


def jitter(layer: nn.Module, seed: int = 2) -> None:
    """Random factors (B != 0) and a magnitude away from the norm it started as."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(layer.named_parameters()):
            if "lora_" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def dora_weight_by_hand(layer: LoraLayer, name: str = "default", detach_norm: bool = True) -> torch.Tensor:
    """``m / ||W + s B A||_c * (W + s B A)`` in the base weight's layout, written out per layer type."""
    weight = layer.base_weight().float()
    scaling, magnitude = layer.scaling[name], layer.lora_magnitude_vector[name].get_parameter("weight")
    if isinstance(layer.base_layer, nn.Embedding):
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]  # (r, V), (D, r)
        adapted = weight + scaling * (b @ a).T  # (V, D)
        norm = adapted.norm(dim=0)  # (D,): each embedding dimension over the vocabulary
        return magnitude / (norm.detach() if detach_norm else norm) * adapted
    a = cast(torch.Tensor, layer.lora_A[name].weight)
    b = cast(torch.Tensor, layer.lora_B[name].weight)
    delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])  # (out, in[, kh, kw])
    adapted = (weight.T if weight.shape != delta.shape else weight) + scaling * delta  # (out, ...): Conv1D is (in, out)
    norm = adapted.flatten(1).norm(dim=1)  # (out,)
    scale = magnitude.flatten() / (norm.detach() if detach_norm else norm)
    adapted = scale.view(-1, *[1] * (adapted.dim() - 1)) * adapted
    return adapted.T if weight.shape != delta.shape else adapted


def output_with(layer: LoraLayer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base module's computation with ``weight`` in place of its own."""
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, weight, padding_idx=base.padding_idx)
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return x @ weight + cast(torch.Tensor, bias)  # Conv1D: (in, out)


# --- the formula -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_and_gradients_are_the_weight_decomposed_formula(kind: str) -> None:
    layer = dora_layer(kind)
    x = layer_input(kind)
    if kind == "embedding":  # the padding row of W' gets no gradient, but B still does through it
        x = x.clamp(min=1)
    out = layer(x)
    expected = output_with(layer, dora_weight_by_hand(layer), x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (out - layer.base_layer(x)).abs().max() > 1e-2
    params = [p for name, p in layer.named_parameters() if "lora_" in name]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    with_gradient_norm = output_with(layer, dora_weight_by_hand(layer, detach_norm=False), x)
    undetached = torch.autograd.grad(with_gradient_norm.square().sum(), params)
    for grad, reference, other in zip(grads, expected_grads, undetached, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-4, rtol=1e-5)
    assert max((g - o).abs().max() for g, o in zip(grads, undetached, strict=True)) > 1e-3  # the norm is a constant


@pytest.mark.parametrize("init", [True, "gaussian", False])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_initial_magnitude_is_peft_s(kind: str, init: Any) -> None:
    """``||W + s B A||_c`` of the freshly initialised factors, drawn in PEFT's order from the same seed."""
    torch.manual_seed(3)
    ours = wrap_module(tiny_layer(kind))
    ours.add_adapter("default", r=R, alpha=ALPHA, init_lora_weights=init, use_dora=True)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, init_lora_weights=init, use_dora=True, fan_in_fan_out=kind == "conv1d"
    )
    layer_class = {"embedding": peft_layer.Embedding, "conv2d": peft_layer.Conv2d}.get(kind, peft_layer.Linear)
    torch.manual_seed(3)
    theirs = layer_class(tiny_layer(kind), "default", config=config, r=R, lora_alpha=ALPHA)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = layer_input(kind)
    if init is not False:  # B (Embedding: A) starts at zero: g = 1 and the layer is the base, bit for bit
        assert torch.equal(ours(x), ours.base_layer(x))


def test_a_new_adapter_over_a_bf16_base_is_the_base_model_bit_for_bit() -> None:
    """The magnitude is the float32 norm the forward takes, so ``g = 1`` exactly. PEFT rounds it to
    bf16 first (its factors are cast to the base dtype before DoRA's init), so its fresh adapter moves
    the logits by a bf16 rounding."""
    model = build_model("llama")
    nn.Module.to(model, torch.bfloat16)
    batch = random_batch(2, 6)
    base = run(model, batch)
    config: dict[str, Any] = {"r": R, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
    with attach_lora(model, LoraConfig(**config)):
        assert torch.equal(run(model, batch), base)
    theirs = peft.get_peft_model(model, peft.LoraConfig(**config))
    assert not torch.equal(run(theirs, batch), base)


def test_magnitude_is_a_trainable_parameter_of_the_adapter() -> None:
    layer = dora_layer("linear")
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert layer.is_dora("default") and magnitude.requires_grad and magnitude.dtype == torch.float32
    assert layer.adapter_parameters("default")[-1] is magnitude
    embedding = dora_layer("embedding")
    assert embedding.adapter_parameters("default")[-1] is embedding.lora_magnitude_vector["default"].weight
    layer.add_adapter("plain", r=2, alpha=2)
    assert not layer.is_dora("plain") and "plain" not in layer.lora_magnitude_vector
    layer.delete_adapter("default")
    assert "default" not in layer.lora_magnitude_vector


# --- per-row adapters --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_each_row_gets_what_its_adapter_gives_alone(kind: str, dtype: torch.dtype) -> None:
    layer = wrap_module(tiny_layer(kind, dtype))
    layer.add_adapter("a", r=R, alpha=ALPHA, use_dora=True)
    layer.add_adapter("b", r=2, alpha=3)  # plain LoRA beside DoRA
    layer.add_adapter("c", r=2, alpha=5, use_dora=True, use_rslora=True)
    jitter(layer)
    layer.eval()
    x = layer_input(kind, batch=5, dtype=dtype)
    rows = ["a", "__base__", "c", "b", "a"]
    with torch.no_grad(), adapter_rows_context(rows):
        mixed = layer(x)
    for index, name in enumerate(rows):
        row = x[index : index + 1]
        with torch.no_grad():
            if name == "__base__":
                alone = layer.base_layer(row)
            else:
                layer.set_active([name])
                alone = layer(row)
        torch.testing.assert_close(mixed[index : index + 1], alone, atol=1e-6 if dtype == torch.float32 else 0, rtol=0)


# --- merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_gives_the_unmerged_output_at_base_cost_and_unmerge_restores_every_bit(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = dora_layer(kind, dtype)
    weight = layer.base_weight()
    original = weight.detach().clone()
    x = layer_input(kind, dtype=dtype)
    with torch.no_grad():
        unmerged = layer(x)
        expected = dora_weight_by_hand(layer).to(dtype)
        layer.merge()
        assert torch.equal(weight, expected) if dtype == torch.bfloat16 else torch.allclose(weight, expected, atol=1e-6)
        with monkeypatch.context() as patch:  # while merged the forward is the base layer's, nothing more
            patch.setattr(LoraLayer, "_added_output", _must_not_run)
            merged = layer(x)
        assert torch.equal(merged, layer.base_layer(x))
    tolerance = ATOL if dtype == torch.float32 else 0.05  # bf16: the merged weight is rounded once
    torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=0 if dtype == torch.float32 else 0.02)
    layer.unmerge()
    assert layer.base_weight() is weight and torch.equal(weight, original)


def _must_not_run(*args: Any) -> torch.Tensor:
    raise AssertionError("an adapter ran while merged")


def test_merged_adapters_act_before_the_unmerged_ones() -> None:
    """DoRA adapters do not commute; one merged is in the weight, so it acts first."""
    layer = wrap_module(tiny_layer("linear"))
    for name in ("a", "b"):
        layer.add_adapter(name, r=R, alpha=ALPHA, use_dora=True)
    jitter(layer)
    x = layer_input("linear")
    with torch.no_grad():
        layer.set_active(["b", "a"])
        b_then_a = layer(x)
        layer.set_active(["a", "b"])
        a_then_b = layer(x)
        layer.merge(["b"])  # the active order stays a, b
        merged_b = layer(x)
        layer.merge(["a"])
        both = layer(x)
    assert (a_then_b - b_then_a).abs().max() > 1e-3
    torch.testing.assert_close(merged_b, b_then_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(both, b_then_a, atol=ATOL, rtol=0)  # merged in the order b, a


def test_bake_writes_the_decomposed_weight_and_detaches(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    handle = attach_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    randomise(handle)
    batch = random_batch(2, 6)
    with handle:
        adapted = run(model, batch)
        layers = {name: cast(LoraLayer, model.get_submodule(name)) for name in handle.target_names}
        expected = {name: dora_weight_by_hand(layer) for name, layer in layers.items()}
    handle.bake()
    assert not handle.is_attached and not any(isinstance(m, LoraLayer) for m in model.modules())
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, batch), adapted, atol=ATOL, rtol=0)


def test_a_dora_adapter_built_while_another_is_merged_starts_from_the_unmerged_weight() -> None:
    """PEFT takes the norm of the weight as it finds it (merged); ours of the original."""
    fields: dict[str, Any] = {"r": R, "lora_alpha": ALPHA, "target_modules": ["q_proj", "v_proj"]}
    model, clean = build_model("llama"), build_model("llama")
    merged = attach_lora(model, LoraConfig(**fields, init_lora_weights=False), adapter_name="merged").attach()
    merged.merge()
    torch.manual_seed(4)
    late = attach_lora(model, LoraConfig(**fields, use_dora=True, init_lora_weights=False), adapter_name="late")
    torch.manual_seed(4)
    fresh = attach_lora(clean, LoraConfig(**fields, use_dora=True, init_lora_weights=False), adapter_name="late")
    late_values, fresh_values = dict(late.named_parameters()), dict(fresh.named_parameters())
    magnitudes = [name for name in late_values if ".lora_magnitude_vector." in name]
    assert magnitudes and all(torch.equal(late_values[n], fresh_values[n]) for n in magnitudes)
    merged.detach()


# --- restoration --------------------------------------------------------------------------------
def state_dict_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_detach_after_training_and_merging_restores_every_bit(
    make_warm_model: Callable[..., PreTrainedModel], family: str, dtype: torch.dtype
) -> None:
    model = make_warm_model(family)
    nn.Module.to(model, dtype)
    warm_up(model)
    targets = TARGETS if family == "llama" else ["c_attn", "c_proj", "c_fc"]
    before, digest = snapshot(model), state_dict_hash(model)
    handle = attach_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_dora=True))
    randomise(handle)
    batch = random_batch(2, 6)
    try:
        with handle:
            optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            handle.merge()
            model(**batch)
        assert_untouched(model, before)
        assert state_dict_hash(model) == digest
    finally:
        detach_everything(model)


def test_magnitudes_are_counted_and_trained(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    handle = attach_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    named = dict(handle.named_parameters())
    magnitudes = {name: p for name, p in named.items() if name.endswith(".lora_magnitude_vector.default.weight")}
    assert len(magnitudes) == len(handle.target_names)
    assert all(p.requires_grad for p in named.values())
    trainable, _ = handle.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in named.values())
    frozen = attach_lora(model, LoraConfig(target_modules=["q_proj"], use_dora=True, inference_mode=True), "frozen")
    assert not any(p.requires_grad for p in frozen.parameters())


# --- refusals ----------------------------------------------------------------------------------
class GroupedConvNet(TinyConvNet):
    """:class:`TinyConvNet` whose second convolution has ``groups=2``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)


def test_dora_on_a_grouped_conv_is_refused_before_anything_changes() -> None:
    """PEFT accepts it and takes the norm of a reshaped, meaningless matrix; we refuse with the reason."""
    model = GroupedConvNet()
    modules, state = dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'conv2': use_dora=True .* Conv2d with groups=2"):
        attach_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"], use_dora=True))
    assert dict(model.named_modules()) == modules and [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with attach_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"])):  # plain LoRA is fine there
        pass
    layer = wrap_module(tiny_layer("conv2d", groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        layer.add_adapter("default", r=2, alpha=2, use_dora=True)
    assert layer.adapter_names == () and not layer.lora_A and not layer.lora_magnitude_vector


def test_dora_over_an_offloaded_weight_is_refused() -> None:
    """DoRA takes the weight's norm at every forward: a weight on the meta device cannot give it."""
    with torch.device("meta"):
        layer = wrap_module(nn.Linear(12, 10))
    with pytest.raises(ValueError, match="use_dora=True for adapter 'default' needs the values .* meta device"):
        layer.add_adapter("default", r=2, alpha=2, use_dora=True)
    assert layer.adapter_names == () and not layer.lora_A
    layer.add_adapter("default", r=2, alpha=2)  # plain LoRA needs no values


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_use_dora_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match=rf"use_dora={value!r} is not accepted"):
        LoraConfig(use_dora=value)  # type: ignore[arg-type]
    layer = wrap_module(tiny_layer("linear"))
    with pytest.raises(ValueError, match="use_dora=.* is not accepted for adapter 'x'"):
        layer.add_adapter("x", r=2, alpha=2, use_dora=value)  # type: ignore[arg-type]
    assert layer.adapter_names == ()


def test_config_round_trips_use_dora_in_peft_s_key() -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    saved = config.to_json_dict()
    assert saved["use_dora"] is True and "use_dora" not in saved.get("prefix_hooks", {})
    assert LoraConfig.from_dict(saved).use_dora is True
    assert LoraConfig.from_dict(peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True).to_dict()).use_dora


# --- bitsandbytes -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_dora_matches_peft_over_the_same_weights(kind: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as peft_bnb

    def quantized() -> nn.Module:
        torch.manual_seed(0)
        dense = nn.Linear(64, 32)
        layer: nn.Module
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(dense.state_dict())
        return layer.to("cpu")  # quantises

    ours = wrap_module(quantized())
    ours.add_adapter("default", r=R, alpha=ALPHA, use_dora=True, init_lora_weights=False)
    jitter(ours)
    ours.train()
    layer_class = peft_bnb.Linear8bitLt if kind == "8bit" else peft_bnb.Linear4bit
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, init_lora_weights=False)
    theirs = layer_class(quantized(), "default", config=config, r=R, lora_alpha=ALPHA).train()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))  # (B, T, IN)
    out, expected = ours(x), theirs(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert (out - ours.base_layer(x)).abs().max() > 1e-2
    out.square().sum().backward()
    expected.square().sum().backward()
    magnitude = ours.lora_magnitude_vector["default"].weight.grad
    assert magnitude is not None
    torch.testing.assert_close(magnitude, theirs.lora_magnitude_vector["default"].weight.grad, atol=1e-4, rtol=1e-5)
