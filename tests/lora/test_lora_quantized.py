"""QLoRA: LoRA over bitsandbytes' Linear8bitLt / Linear4bit, against PEFT's lora.bnb layers.

Skipped as a whole when bitsandbytes is not installed. bitsandbytes >= 0.45 runs both layer
types on CPU; on a CUDA machine the same tests run on the GPU as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peft
from peft.tuners.lora import bnb as peft_bnb

from prefix_hooks.core.rows import adapter_rows_context
from prefix_hooks.lora.layers import LoraLayer, wrap_module
from prefix_hooks.lora.quantized import LoraLinear4bit, LoraLinear8bitLt

IN, OUT, R, ALPHA, BSZ, SEQ = 64, 32, 4, 8, 3, 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def quantized_linear(kind: str, device: str, seed: int = 0) -> nn.Module:
    """A bitsandbytes layer holding the quantised weights of a seeded ``nn.Linear(IN, OUT)``."""
    torch.manual_seed(seed)
    dense = nn.Linear(IN, OUT)
    layer: nn.Module
    if kind == "8bit":
        layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(IN, OUT, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    return layer.to(device)  # quantises


def randomize(layer: nn.Module, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def peft_layer(kind: str, base: nn.Module) -> Any:
    cls: Callable[..., Any] = peft_bnb.Linear8bitLt if kind == "8bit" else peft_bnb.Linear4bit
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False)
    return cls(base, "default", config=config, r=R, lora_alpha=ALPHA)


def make_ours(kind: str, device: str) -> LoraLayer:
    layer = wrap_module(quantized_linear(kind, device))
    layer.add_adapter("default", r=R, alpha=ALPHA)
    randomize(layer)
    return layer.eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "cls"), [("8bit", LoraLinear8bitLt), ("4bit", LoraLinear4bit)])
def test_quantized_layer_matches_peft_and_the_formula(kind: str, cls: type, device: str) -> None:
    base = quantized_linear(kind, device)
    weight = base.weight
    ours = wrap_module(base)
    assert type(ours) is cls and ours.base_layer is base and ours.base_weight() is weight
    ours.add_adapter("default", r=R, alpha=ALPHA)
    assert all(p.dtype == torch.float32 and p.device.type == device for p in ours.adapter_parameters("default"))
    randomize(ours)
    ours.eval()
    theirs = peft_layer(kind, quantized_linear(kind, device)).eval()
    adapter_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    missing, unexpected = theirs.load_state_dict(adapter_state, strict=False)  # base: quantised extras
    assert not unexpected and not [k for k in missing if "lora_" in k]
    x = torch.randn(BSZ, SEQ, IN, generator=torch.Generator().manual_seed(1)).to(device)  # (B, T, IN)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=0)
        a, b = ours.lora_A["default"], ours.lora_B["default"]
        expected = base(x) + b(a(x)) * (ALPHA / R)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert (out - base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_training_step_moves_only_the_adapter(kind: str) -> None:
    ours = make_ours(kind, "cpu").train()
    x = torch.randn(BSZ, SEQ, IN)
    ours(x).square().mean().backward()
    for param in ours.adapter_parameters("default"):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert not ours.base_weight().requires_grad


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_rows_and_merge(kind: str) -> None:
    ours = make_ours(kind, "cpu")
    ours.add_adapter("other", r=2, alpha=2)
    randomize(ours)
    x = torch.randn(BSZ, SEQ, IN)
    rows = ["other", "__base__", "default"]
    with torch.no_grad():
        with adapter_rows_context(rows):
            mixed = ours(x)
        for index, name in enumerate(rows):
            row = x[index : index + 1]
            if name == "__base__":
                expected = ours.base_layer(row)
            else:
                ours.set_active([name])
                expected = ours(row)
            torch.testing.assert_close(mixed[index : index + 1], expected, atol=1e-5, rtol=0)
    weight = ours.base_weight()
    data = weight.detach().clone()
    with pytest.raises(ValueError, match="cannot merge LoRA into a bitsandbytes"):
        ours.merge()
    assert not ours.is_merged and ours.base_weight() is weight and torch.equal(cast(torch.Tensor, weight), data)
    assert ours.delta_weight("default").shape == (OUT, IN)
