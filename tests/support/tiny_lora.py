"""Tiny models, inputs and LoRA configs shared by the LoRA tests (built from configs, seeded, no hub)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tiny_encoders import build as build_encoder
from tiny_encoders import example_inputs as encoder_inputs
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks.lora import LoraAttachment

IMAGE = 16
NOISE = 0.2


class TinyConvNet(nn.Module):
    """Two convolutions and a linear head: ``(B, 3, 16, 16)`` images -> ``(B, 5)`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(6 * 8 * 8, 5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.conv1(pixel_values))  # (B, 8, 16, 16)
        hidden = F.relu(self.conv2(hidden))  # (B, 6, 8, 8)
        return self.head(hidden.flatten(1))  # (B, 5)


def build_conv(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def conv_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))}


@dataclass
class Case:
    """A model, its inputs and the LoRA config fields (PEFT's names, used for both sides)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    fields: dict[str, Any]
    peft_only: dict[str, Any] = field(default_factory=dict)  # fields only PEFT needs


def _llama() -> nn.Module:
    return build_model("llama")


def _llama_inputs() -> dict[str, torch.Tensor]:
    return random_batch(2, 7, seed=1, left_pad=[0, 2])


CASES: dict[str, Case] = {
    "llama": Case(_llama, _llama_inputs, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "llama-all-linear": Case(_llama, _llama_inputs, {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}),
    "llama-rslora-patterns": Case(
        _llama,
        _llama_inputs,
        {
            "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.o_proj": 6}, "alpha_pattern": {"down_proj": 3.0},
            "lora_dropout": 0.0,
        },
    ),
    "llama-regex-dropout-eval": Case(
        _llama, _llama_inputs, {"r": 3, "lora_alpha": 5, "target_modules": r".*\.(k_proj|up_proj)", "lora_dropout": 0.1}
    ),
    "llama-embedding": Case(_llama, _llama_inputs, {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}),
    "gpt2-conv1d": Case(
        lambda: build_model("gpt2"),
        _llama_inputs,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        {"fan_in_fan_out": True},  # PEFT warns (an error here) unless told that Conv1D stores (in, out)
    ),
    "bert-seq-cls": Case(
        lambda: build_encoder("bert"),
        lambda: encoder_inputs("bert"),
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"],
         "task_type": "SEQ_CLS"},
    ),
    "vit-image-cls": Case(
        lambda: build_encoder("vit"),
        lambda: encoder_inputs("vit"),
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1", "projection"],
         "modules_to_save": ["classifier"]},  # projection: the patch-embedding Conv2d,
    ),
    "conv2d": Case(build_conv, conv_inputs, {"r": 2, "lora_alpha": 4, "target_modules": ["conv1", "conv2", "head"]}),
}


def is_adapter_key(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def output_logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return output_logits(model(**inputs))



def randomise(handle: LoraAttachment, seed: int = 5, noise: float = NOISE) -> None:
    """Add ``noise`` * N(0, 1) (from ``seed``, in name order) to every adapter parameter, so B != 0
    and the modules-to-save copies differ from their originals."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(handle.named_parameters())
    with torch.no_grad():
        for name in sorted(parameters):
            parameter = parameters[name]
            parameter.add_(noise * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
