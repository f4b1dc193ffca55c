"""AdaLoRA's SVD layers on their own: the forward and the merged delta against the formula written out,
Conv1D's transposed layout, pruning rows, the refusals, and bitsandbytes layers against PEFT's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks import AdaLoraConfig
from prefix_hooks.lora.adalora.layers import SvdConv1D, SvdLayer, SvdLinear, wrap_svd_module

IN, OUT, R, ALPHA, BSZ, SEQ = 12, 10, 4, 16, 3, 5
CONFIG = AdaLoraConfig(init_r=R, target_r=2, lora_alpha=ALPHA, total_step=10, init_lora_weights=False)


def svd_layer(base: nn.Module) -> SvdLayer:
    layer = wrap_svd_module(base)
    layer.add_svd_adapter("default", CONFIG)
    return layer


def formula(x: torch.Tensor, layer: SvdLayer) -> torch.Tensor:
    """``(x @ (A * E).T @ B.T) * alpha / (init_r + 1e-5)``, written out."""
    a_weight, e_weight, b_weight = layer.factors("default")
    return x @ (a_weight * e_weight).T @ b_weight.T * ALPHA / (R + 1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_delta_weight_follow_the_formula(kind: str) -> None:
    base: nn.Module = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    layer = svd_layer(base)
    assert isinstance(layer, SvdLinear if kind == "linear" else SvdConv1D)
    a_weight, e_weight, b_weight = layer.factors("default")
    assert (a_weight.shape, e_weight.shape, b_weight.shape) == ((R, IN), (R, 1), (OUT, R))
    assert layer.ranknum["default"].item() == R and not layer.ranknum["default"].requires_grad
    x = torch.randn(BSZ, SEQ, IN)
    expected_update = formula(x, layer)
    torch.testing.assert_close(layer(x), base(x) + expected_update, atol=1e-6, rtol=0)
    delta = layer.delta_weight("default")  # the base weight's layout: (out, in), or (in, out) for Conv1D
    assert delta.shape == base.weight.shape
    dense = delta if kind == "linear" else delta.T
    torch.testing.assert_close(x @ dense.T, expected_update, atol=1e-5, rtol=0)


def test_keep_rows_keeps_the_flagged_triplets_and_the_scale() -> None:
    layer = svd_layer(nn.Linear(IN, OUT))
    a_weight, e_weight, b_weight = (p.detach().clone() for p in layer.factors("default"))
    with torch.no_grad():
        layer.lora_E["default"][[1, 3]] = 0.0  # what masking does before a save
    x = torch.randn(BSZ, IN)
    before = layer(x)
    layer.keep_rows("default", [True, False, True, False])
    kept_a, kept_e, kept_b = layer.factors("default")
    assert torch.equal(kept_a, a_weight[[0, 2]]) and torch.equal(kept_e, e_weight[[0, 2]])
    assert torch.equal(kept_b, b_weight[:, [0, 2]])
    assert layer.r["default"] == 2 and layer.ranknum["default"].item() == R
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"keep_rows got 4 flags for adapter 'default', which has 2 triplets"):
        layer.keep_rows("default", [True] * 4)


def test_unsupported_modules_and_options_are_refused() -> None:
    with pytest.raises(TypeError, match=r"AdaLoRA cannot adapt a torch.nn.modules.sparse.Embedding"):
        wrap_svd_module(nn.Embedding(5, 4))
    with pytest.raises(TypeError, match=r"already a LoRA layer"):
        wrap_svd_module(svd_layer(nn.Linear(IN, OUT)))
    layer = wrap_svd_module(nn.Linear(IN, OUT))
    with pytest.raises(ValueError, match=r"use_rslora=True is not accepted"):
        layer.add_adapter("a", r=2, alpha=4, use_rslora=True)
    with pytest.raises(ValueError, match=r"ADALORA does not support DoRA"):
        layer.add_adapter("a", r=2, alpha=4, use_dora=True)
    assert layer.adapter_names == ()  # nothing was added


# --- bitsandbytes ---------------------------------------------------------------------------
QUANTIZED: dict[str, Callable[[Any], nn.Module]] = {  # bitsandbytes -> an empty (64 -> 32) layer of that kind
    "8bit": lambda bnb: bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False),
    "4bit": lambda bnb: bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4"),
}


def quantized(kind: str) -> nn.Module:
    """The ``kind`` layer holding a seeded ``nn.Linear(64, 32)``'s weights, quantised (bitsandbytes runs on CPU)."""
    layer = QUANTIZED[kind](pytest.importorskip("bitsandbytes"))
    torch.manual_seed(0)
    layer.load_state_dict(nn.Linear(64, 32).state_dict())
    return layer.to("cpu")


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_bitsandbytes_layers_equal_peft_and_refuse_merging(kind: str) -> None:
    from peft.tuners.adalora import bnb as peft_bnb

    config = peft.AdaLoraConfig(init_r=R, target_r=2, lora_alpha=ALPHA, total_step=10, init_lora_weights=False)
    cls: Any = peft_bnb.SVDLinear8bitLt if kind == "8bit" else peft_bnb.SVDLinear4bit
    theirs = cls(quantized(kind), "default", config=config, r=R, lora_alpha=ALPHA)
    ours = wrap_svd_module(quantized(kind))
    assert type(ours).__name__ == ("SvdLinear8bitLt" if kind == "8bit" else "SvdLinear4bit")
    ours.add_svd_adapter("default", AdaLoraConfig(init_r=R, target_r=2, lora_alpha=ALPHA, total_step=10))
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(ours, name)["default"].copy_(getattr(theirs, name)["default"])
    x = torch.randn(BSZ, SEQ, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(x)
        assert (expected - theirs.base_layer(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"cannot merge LoRA into a bitsandbytes"):
        ours.merge()
