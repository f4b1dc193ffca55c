"""LoRA layers against PEFT's own layers on identical weights, plus merge/unmerge and per-row checks.

The oracle is PEFT 0.21's ``peft.tuners.lora.layer`` classes built over an identical base
module: our state dict loads into them strictly (same parameter names and shapes), and
outputs, gradients, delta weights and initial values are compared. Independent checks: the
two-convolution identity for Conv2d, hand-written dropout, bitwise restoration on unmerge.
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_layer
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.rows import adapter_rows_context, current_adapter_rows
from prefix_hooks.lora.layers import LoraConv1D, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, wrap_module

IN, OUT, VOCAB, R, ALPHA = 12, 10, 11, 4, 8
BSZ, SEQ = 4, 5
KINDS = ("linear", "conv1d", "embedding", "conv2d")
ATOL = 1e-6


def make_base(
    kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, groups: int = 1, dilation: int = 1
) -> nn.Module:
    """One original module of the given kind, seeded."""
    torch.manual_seed(seed)
    base: nn.Module
    if kind == "linear":
        base = nn.Linear(IN, OUT)
    elif kind == "conv1d":
        base = Conv1D(OUT, IN)  # weight (IN, OUT)
        nn.init.normal_(base.bias)
    elif kind == "embedding":
        base = nn.Embedding(VOCAB, OUT, padding_idx=0)
    elif kind == "conv2d":
        base = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=dilation, groups=groups)
    else:
        raise AssertionError(kind)
    return base.to(dtype)


def make_input(kind: str, seed: int = 1, batch: int = BSZ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)  # (B, T)
        ids[:, 0] = 0  # the padding index appears in every row
        return ids
    if kind == "conv2d":
        return torch.randn(batch, 4, 9, 9, generator=generator)  # (B, C, H, W)
    return torch.randn(batch, SEQ, IN, generator=generator)  # (B, T, IN)


def weight_of(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def randomize(layer: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Give every adapter parameter a non-trivial value (B is zero after the default init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def peft_config(
    kind: str, r: int = R, alpha: int = ALPHA, dropout: float = 0.0, rslora: bool = False, init: Any = True
) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        init_lora_weights=init,
        fan_in_fan_out=kind == "conv1d",
    )


def make_peft(kind: str, base: nn.Module, name: str = "default", **config: Any) -> Any:
    """PEFT's layer of the matching kind over ``base`` (callers pass an independent, identical base)."""
    cfg = peft_config(kind, **config)
    cls: Any
    extra: dict[str, bool] = {}
    if kind == "linear":
        cls = peft_layer.Linear
    elif kind == "conv1d":
        cls, extra = peft_layer.Linear, {"is_target_conv_1d_layer": True}
    elif kind == "embedding":
        cls = peft_layer.Embedding
    else:
        cls = peft_layer.Conv2d
    return cls(base, name, config=cfg, r=cfg.r, lora_alpha=cfg.lora_alpha, **extra)


def make_ours(kind: str, base: nn.Module, name: str = "default", **adapter: Any) -> LoraLayer:
    layer = wrap_module(base)
    layer.add_adapter(name, **({"r": R, "alpha": ALPHA} | adapter))
    return layer


def as_float32_adapters(layer: Any) -> None:
    """PEFT's layer casts its adapters to the base dtype; get_peft_model would upcast them to float32."""
    for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        container = getattr(layer, attr)
        for key in list(container.keys()):
            if isinstance(container, nn.ParameterDict):
                container[key] = nn.Parameter(container[key].detach().float())
            else:
                container[key].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- types and sharing
@pytest.mark.parametrize(
    ("kind", "cls"),
    [("linear", LoraLinear), ("conv1d", LoraConv1D), ("embedding", LoraEmbedding), ("conv2d", LoraConv2d)],
)
def test_wrap_module_shares_the_original(kind: str, cls: type[LoraLayer]) -> None:
    base = make_base(kind)
    weight, bias = weight_of(base), getattr(base, "bias", None)
    layer = make_ours(kind, base)
    assert type(layer) is cls
    assert layer.base_layer is base
    assert layer.base_layer.weight is weight and layer.weight is weight  # attribute falls through to the base
    assert getattr(layer.base_layer, "bias", None) is bias
    randomize(layer)
    layer.merge()
    layer.unmerge()
    assert layer.base_layer.weight is weight and layer.base_weight() is weight


def test_wrap_module_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="LayerNorm.*supported types"):
        wrap_module(nn.LayerNorm(4))
    layer = wrap_module(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="already a LoRA layer"):
        wrap_module(layer)


def test_attributes_fall_through_to_the_base() -> None:
    layer = make_ours("embedding", make_base("embedding"))
    assert layer.padding_idx == 0 and layer.num_embeddings == VOCAB and layer.embedding_dim == OUT
    conv = make_ours("conv2d", make_base("conv2d"))
    assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)
    with pytest.raises(AttributeError):
        _ = layer.no_such_attribute


# ---------------------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_parity_one_adapter(kind: str, rslora: bool) -> None:
    ours = make_ours(kind, make_base(kind), use_rslora=rslora)
    randomize(ours)
    theirs = make_peft(kind, make_base(kind), rslora=rslora)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes
    assert ours.scaling == theirs.scaling
    x = make_input(kind)
    out, expected = ours(x), theirs(x)
    assert_close(out, expected)
    assert (out - ours.base_layer(x)).abs().max() > 1e-2  # the adapter contributes
    # gradients of the adapter parameters match too
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if "lora_" in name:
            assert param.grad is not None
            assert_close(param.grad, grads[name].grad, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_parity_two_adapters(kind: str) -> None:
    ours = make_ours(kind, make_base(kind))
    ours.add_adapter("other", r=2, alpha=3, use_rslora=True)
    randomize(ours)
    theirs = make_peft(kind, make_base(kind))
    theirs.update_layer("other", 2, lora_alpha=3, config=peft_config(kind, r=2, alpha=3, rslora=True))
    theirs.set_adapter(["default", "other"])
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert ours.active_adapters == ["default", "other"]
    x = make_input(kind)
    assert_close(ours(x), theirs(x))
    ours.set_active(["other"])
    theirs.set_adapter(["other"])
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("kind", KINDS)
def test_peft_parity_bf16_base(kind: str) -> None:
    """bf16 base, float32 adapters (what get_peft_model gives): same output bit for bit."""
    ours = make_ours(kind, make_base(kind, dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    randomize(ours)
    theirs = make_peft(kind, make_base(kind, dtype=torch.bfloat16))
    as_float32_adapters(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input(kind)
    if x.is_floating_point():
        x = x.to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, theirs(x))


def test_peft_parity_conv2d_groups() -> None:
    ours = make_ours("conv2d", make_base("conv2d", groups=2), r=4)
    randomize(ours)
    theirs = make_peft("conv2d", make_base("conv2d", groups=2))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input("conv2d")
    assert_close(ours(x), theirs(x))
    weight = ours.base_weight().clone()
    with pytest.raises(ValueError, match="groups=2 cannot be merged"):
        ours.merge()
    assert torch.equal(ours.base_weight(), weight) and not ours.is_merged
    with pytest.raises(ValueError, match="r=3 .* divisible by the Conv2d's groups=2"):
        ours.add_adapter("odd", r=3, alpha=1)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_matches_peft(kind: str) -> None:
    ours = make_ours(kind, make_base(kind), use_rslora=True)
    randomize(ours)
    theirs = make_peft(kind, make_base(kind), rslora=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    delta = ours.delta_weight("default")
    assert delta.shape == ours.base_weight().shape
    assert_close(delta, theirs.get_delta_weight("default"))


def test_scaled_embedding_scales_the_update_as_peft() -> None:
    """Gemma-style embeddings multiply their output by embed_scale; the LoRA update is scaled too."""

    def scaled() -> nn.Embedding:
        torch.manual_seed(0)
        return Gemma3TextScaledWordEmbedding(VOCAB, OUT, 0, embed_scale=3.0)

    ours = make_ours("embedding", scaled())
    randomize(ours)
    theirs = make_peft("embedding", scaled())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input("embedding")
    out = ours(x)
    assert_close(out, theirs(x))
    update = F.embedding(x, ours.lora_embedding_A["default"].T) @ ours.lora_embedding_B["default"].T
    assert_close(out, ours.base_layer(x) + 3.0 * update * ours.scaling["default"], atol=1e-5)
    ours.merge()
    assert_close(ours(x), out, atol=1e-5)


# ---------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_train_mode_matches_peft_and_eval_is_deterministic(kind: str) -> None:
    ours = make_ours(kind, make_base(kind), dropout=0.5)
    randomize(ours)
    theirs = make_peft(kind, make_base(kind), dropout=0.5)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = make_input(kind)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    out_train = ours(x)
    torch.manual_seed(7)
    assert_close(out_train, theirs(x))  # same dropout draws, same maths
    ours.eval()
    out_eval = ours(x)
    assert torch.equal(out_eval, ours(x))
    ours.lora_dropout["default"] = nn.Identity()
    assert torch.equal(out_eval, ours(x))  # eval mode means no dropout
    if kind != "embedding":  # PEFT applies no dropout to token ids
        assert (out_train - out_eval).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dropout_touches_only_the_adapter_path(kind: str) -> None:
    ours = make_ours(kind, make_base(kind), dropout=0.5)
    randomize(ours)
    ours.train()
    x = make_input(kind)
    torch.manual_seed(3)
    out = ours(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, p=0.5, training=True)
    a, b = ours.lora_A["default"], ours.lora_B["default"]
    expected = ours.base_layer(x) + b(a(dropped)) * ours.scaling["default"]
    assert_close(out, expected)


# ---------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", KINDS)
def test_merged_output_equals_unmerged(kind: str) -> None:
    ours = make_ours(kind, make_base(kind))
    ours.add_adapter("other", r=2, alpha=2.0)
    randomize(ours)
    x = make_input(kind)
    unmerged = ours(x)
    ours.merge(["default"])  # one merged, one still added on the fly
    assert ours.merged_adapters == ["default"]
    assert_close(ours(x), unmerged, atol=1e-5)
    ours.merge()
    assert ours.merged_adapters == ["default", "other"] and ours.is_merged
    assert_close(ours(x), unmerged, atol=1e-5)
    assert_close(ours.base_layer(x), unmerged, atol=1e-5)  # everything is in the weight


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_weight_bitwise(kind: str, dtype: torch.dtype) -> None:
    base = make_base(kind, dtype=dtype)
    original = weight_of(base).detach().clone()
    ours = make_ours(kind, base)
    ours.add_adapter("other", r=2, alpha=16.0)
    randomize(ours, std=1.0)
    ours.merge()
    merged = weight_of(base).detach().clone()
    assert not torch.equal(merged, original)
    ours.unmerge()
    assert torch.equal(weight_of(base), original) and not ours.is_merged
    # the test can fail: subtracting the deltas again (PEFT's unmerge) does not give the original
    subtracted = merged
    for name in ("other", "default"):
        subtracted = subtracted - ours.delta_weight(name).detach().to(dtype)
    if dtype == torch.bfloat16:
        assert not torch.equal(subtracted, original)


def test_merge_validates_names_before_touching_the_weight() -> None:
    ours = make_ours("linear", make_base("linear"))
    randomize(ours)
    weight = ours.base_weight().detach().clone()
    with pytest.raises(KeyError, match="'nope'"):
        ours.merge(["default", "nope"])
    assert torch.equal(ours.base_weight(), weight) and not ours.is_merged
    ours.merge(["default"])
    ours.merge(["default"])  # already merged: nothing more is added
    assert_close(ours.base_weight(), weight + ours.delta_weight("default"), atol=1e-6)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        ours.delete_adapter("default")
    ours.unmerge()
    ours.unmerge()  # no-op
    assert torch.equal(ours.base_weight(), weight)


def test_disabled_gives_the_base_and_unmerges() -> None:
    ours = make_ours("linear", make_base("linear"))
    randomize(ours)
    x = make_input("linear")
    weight = ours.base_weight().detach().clone()
    base_out = F.linear(x, weight, cast(nn.Linear, ours.base_layer).bias)
    ours.merge()
    ours.disabled = True
    assert torch.equal(ours(x), base_out)
    assert torch.equal(ours.base_weight(), weight) and not ours.is_merged
    ours.disabled = False
    ours.set_active([])
    assert torch.equal(ours(x), base_out)


@pytest.mark.parametrize("dilation", [1, 2])
def test_conv2d_delta_is_the_two_convolution_identity(dilation: int) -> None:
    ours = make_ours("conv2d", make_base("conv2d", dilation=dilation), use_rslora=True)
    randomize(ours)
    base = cast(nn.Conv2d, ours.base_layer)
    x = make_input("conv2d")
    weight_a, weight_b = weight_of(ours.lora_A["default"]), weight_of(ours.lora_B["default"])
    stride, padding = (2, 2), (1, 1)  # as make_base builds it
    assert base.stride == stride and base.padding == padding and base.dilation == (dilation, dilation)
    two_convs = F.conv2d(x, base.weight, base.bias, stride, padding, dilation) + F.conv2d(
        F.conv2d(x, weight_a, None, stride, padding, dilation), weight_b
    ) * (ALPHA / math.sqrt(R))
    one_conv = F.conv2d(x, base.weight + ours.delta_weight("default"), base.bias, stride, padding, dilation)
    assert_close(one_conv, two_convs, atol=1e-5)
    assert_close(ours(x), two_convs, atol=1e-5)


# ---------------------------------------------------------------------------- per-row batches
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_rows_equal_each_row_alone(kind: str) -> None:
    ours = make_ours(kind, make_base(kind), name="a")
    ours.add_adapter("b", r=2, alpha=5)
    ours.add_adapter("c", r=3, alpha=1)  # held, never named in the rows
    randomize(ours)
    x = make_input(kind)
    rows = ["b", "__base__", "a", "b"]
    with adapter_rows_context(rows):
        mixed = ours(x)
    assert current_adapter_rows() is None
    for index, name in enumerate(rows):
        row = x[index : index + 1]
        if name == "__base__":
            expected = ours.base_layer(row)
        else:
            ours.set_active([name])
            expected = ours(row)
        assert_close(mixed[index : index + 1], expected, atol=1e-5)  # batch-size dependent conv kernels
    ours.set_active(["a", "b", "c"])
    assert ours.active_adapters == ["a", "b", "c"]
    # and PEFT's adapter_names gives the same rows
    theirs = make_peft(kind, make_base(kind), name="a")
    theirs.update_layer("b", 2, lora_alpha=5, config=peft_config(kind, r=2, alpha=5))
    theirs.update_layer("c", 3, lora_alpha=1, config=peft_config(kind, r=3, alpha=1))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_close(mixed, theirs(x, adapter_names=rows), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_mixed_rows_bf16_round_once(kind: str) -> None:
    """A bf16 row gets its float32 update rounded once, exactly as when it runs alone."""
    ours = make_ours(kind, make_base(kind, dtype=torch.bfloat16), name="a")
    ours.add_adapter("b", r=2, alpha=5)
    randomize(ours)
    x = make_input(kind)
    if x.is_floating_point():
        x = x.to(torch.bfloat16)
    rows = ["b", "a", "a", "b"]
    with adapter_rows_context(rows):
        mixed = ours(x)
    for name in ("a", "b"):
        picked = [index for index, row in enumerate(rows) if row == name]
        ours.set_active([name])
        assert torch.equal(mixed[picked], ours(x[picked]))


def test_mixed_rows_wrong_length_or_merged_raises() -> None:
    ours = make_ours("linear", make_base("linear"))
    x = make_input("linear")
    with (
        adapter_rows_context(["default"] * (BSZ - 1)),
        pytest.raises(ValueError, match=f"name {BSZ - 1} rows .* {BSZ}"),
    ):
        ours(x)
    ours.merge()
    with adapter_rows_context(["default"] * BSZ), pytest.raises(ValueError, match="merged"):
        ours(x)


def test_rows_name_unknown_to_the_layer_is_the_base() -> None:
    """Adapters may target different modules, so a layer gives the base to names it does not hold."""
    ours = make_ours("linear", make_base("linear"))
    randomize(ours)
    x = make_input("linear")
    with adapter_rows_context(["elsewhere"] * BSZ):
        assert torch.equal(ours(x), ours.base_layer(x))


def test_adapter_rows_context_validates_and_nests() -> None:
    with pytest.raises(TypeError, match="list or tuple"), adapter_rows_context("abc"):
        pass
    with pytest.raises(ValueError, match="empty"), adapter_rows_context([]):
        pass
    with pytest.raises(TypeError, match="strings"), adapter_rows_context(["a", 3]):  # type: ignore[list-item]
        pass
    with adapter_rows_context(["a", "b"]):
        assert current_adapter_rows() == ("a", "b")
        with adapter_rows_context(None):
            assert current_adapter_rows() is None
        assert current_adapter_rows() == ("a", "b")
    assert current_adapter_rows() is None


# ---------------------------------------------------------------------------- init
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_equals_peft_under_the_same_seed(kind: str, init: Any) -> None:
    base_ours, base_theirs = make_base(kind), make_base(kind)
    torch.manual_seed(123)
    theirs = make_peft(kind, base_theirs, init=init)
    torch.manual_seed(123)
    ours = make_ours(kind, base_ours, init_lora_weights=init)
    expected = {n: p for n, p in theirs.state_dict().items() if "lora_" in n}
    got = {n: p for n, p in ours.state_dict().items() if "lora_" in n}
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_statistics(init: Any) -> None:
    r, fan_in = 8, 512
    layer = wrap_module(nn.Linear(fan_in, 64))
    layer.add_adapter("x", r=r, alpha=8, init_lora_weights=init)
    a, b = weight_of(layer.lora_A["x"]), weight_of(layer.lora_B["x"])
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound
    if init is True:
        assert a.abs().max() <= bound and a.std() > 0.5 * bound / math.sqrt(3)
        assert torch.count_nonzero(b) == 0
    elif init == "gaussian":
        assert abs(a.std().item() - 1 / r) < 0.01 and torch.count_nonzero(b) == 0
    else:
        assert torch.count_nonzero(b) == b.numel() and b.abs().max() <= 1 / math.sqrt(r)
    embedding = wrap_module(nn.Embedding(256, 64))
    embedding.add_adapter("x", r=r, alpha=8, init_lora_weights=init)
    emb_a, emb_b = embedding.lora_embedding_A["x"], embedding.lora_embedding_B["x"]
    assert (torch.count_nonzero(emb_a) == 0) == (init is not False)
    assert abs(emb_b.std().item() - 1.0) < 0.1


# ---------------------------------------------------------------------------- adapter management
def test_add_adapter_validates_before_changing_anything() -> None:
    layer = make_ours("linear", make_base("linear"))
    keys = set(layer.state_dict())
    bad_calls: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"name": "default"}, ValueError, "already exists"),
        ({"name": "__base__"}, ValueError, "reserved"),
        ({"name": "a.b"}, ValueError, "without '.'"),
        ({"name": "update"}, ValueError, "clashes"),
        ({"r": 0}, ValueError, "r=0"),
        ({"r": 2.0}, ValueError, "r=2.0"),
        ({"alpha": -1}, ValueError, "alpha=-1"),
        ({"dropout": 1.0}, ValueError, r"dropout=1.0"),
        ({"init_lora_weights": "pissa"}, ValueError, "'pissa'"),
    ]
    for overrides, error, message in bad_calls:
        kwargs = {"name": "new", "r": 2, "alpha": 2} | overrides
        with pytest.raises(error, match=message):
            layer.add_adapter(**kwargs)  # type: ignore[arg-type]
    assert set(layer.state_dict()) == keys and layer.adapter_names == ("default",)


def test_delete_and_set_active() -> None:
    layer = make_ours("embedding", make_base("embedding"), name="a")
    layer.add_adapter("b", r=2, alpha=2)
    randomize(layer)
    x = make_input("embedding")
    only_b = copy.deepcopy(layer)
    only_b.set_active(["b"])
    with pytest.raises(KeyError, match="'zz'"):
        layer.set_active(["a", "zz"])
    with pytest.raises(ValueError, match="repeated"):
        layer.set_active(["a", "a"])
    with pytest.raises(TypeError, match="list of adapter names"):
        layer.set_active("a")  # type: ignore[arg-type]
    layer.delete_adapter("a")
    assert layer.adapter_names == ("b",) and layer.active_adapters == ["b"]
    assert not any(".a" in key for key in layer.state_dict())
    assert torch.equal(layer(x), only_b(x))
    with pytest.raises(KeyError, match="'a'"):
        layer.delete_adapter("a")
    assert [p.shape for p in layer.adapter_parameters("b")] == [(2, VOCAB), (OUT, 2)]


def test_adapters_follow_the_base_device_and_stay_float32_on_meta() -> None:
    with torch.device("meta"):
        base = nn.Linear(4096, 4096, dtype=torch.bfloat16)
    layer = wrap_module(base)
    layer.add_adapter("default", r=8, alpha=16)
    for param in layer.adapter_parameters("default"):
        assert param.device.type == "meta" and param.dtype == torch.float32
