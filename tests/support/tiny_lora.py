"""Tiny models, inputs and LoRA configs shared by the LoRA tests (built from configs, seeded, no hub)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
import torch.nn.functional as F
from tiny_encoders import build as build_encoder
from tiny_encoders import example_inputs as encoder_inputs
from tiny_models import build_model, random_batch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefix_hooks.lora import LoraAttachment, LoraConfig, attach_lora

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


LAYER_KINDS = ("linear", "conv1d", "embedding", "conv2d")
"""The module types a LoRA layer wraps, as named by :func:`tiny_layer`."""


def tiny_layer(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, groups: int = 1) -> nn.Module:
    """One seeded original module: Linear(12, 10), Conv1D (weight (12, 10), random bias),
    Embedding(11, 10) with padding index 0, or Conv2d(4, 6, 3, stride 2, padding 1, ``groups``)."""
    torch.manual_seed(seed)
    module: nn.Module
    if kind == "linear":
        module = nn.Linear(12, 10)
    elif kind == "conv1d":
        module = Conv1D(10, 12)
        nn.init.normal_(module.bias)
    elif kind == "embedding":
        module = nn.Embedding(11, 10, padding_idx=0)
    elif kind == "conv2d":
        module = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    else:
        raise ValueError(f"kind={kind!r}; expected one of {LAYER_KINDS}")
    return module.to(dtype)


def layer_input(kind: str, batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An input for :func:`tiny_layer`: ids ``(B, 5)`` with padding in column 0, images ``(B, 4, 9, 9)``,
    or ``(B, 5, 12)``."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        ids = torch.randint(0, 11, (batch, 5), generator=generator)  # (B, T)
        ids[:, 0] = 0
        return ids
    shape = (batch, 4, 9, 9) if kind == "conv2d" else (batch, 5, 12)  # (B, C, H, W) / (B, T, IN)
    return torch.randn(shape, generator=generator).to(dtype)


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


DORA_CASES: dict[str, Case] = {
    # every layer type DoRA takes: Linear (llama, bert), Conv1D (gpt2), Embedding (llama), Conv2d
    "llama": Case(
        _llama,
        _llama_inputs,
        {"r": 4, "lora_alpha": 8, "use_dora": True,
         "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
    ),
    "gpt2": Case(
        lambda: build_model("gpt2"),
        _llama_inputs,
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        {"fan_in_fan_out": True},
    ),
    "bert-seq-cls": Case(
        lambda: build_encoder("bert"),
        lambda: encoder_inputs("bert"),
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["query", "value"],
         "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    ),
    "conv2d": Case(
        build_conv,
        conv_inputs,
        {"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": ["conv1", "conv2", "head"]},
    ),
}
"""DoRA (``use_dora=True``) over the model families PEFT parity is claimed for."""


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
            parameters[name].add_(noise_like(parameters[name], generator, noise))


PEFT_PREFIX = "base_model.model."


def peft_twin(
    case: Case, dtype: torch.dtype = torch.float32, seed: int = 5, adapter_name: str = "default"
) -> tuple[peft.PeftModel, nn.Module, LoraAttachment]:
    """(PEFT's model, our model, our unattached handle) for ``case`` with the base in ``dtype``.

    PEFT's adapter parameters (float32 over any base, its ``autocast_adapter_dtype``) get
    ``NOISE`` * N(0, 1) from ``seed`` added in name order (so B != 0 and a DoRA magnitude is not
    the norm it started as) and are copied into ours by name, which must be the same set.
    """
    config = peft.LoraConfig(**copy.deepcopy(case.fields), **case.peft_only)  # PEFT extends modules_to_save in place
    peft_model = peft.get_peft_model(case.build().to(dtype), config, adapter_name=adapter_name).eval()
    ours = case.build().to(dtype)
    handle = attach_lora(ours, LoraConfig(**case.fields), adapter_name=adapter_name)
    theirs = {name.removeprefix(PEFT_PREFIX): p for name, p in peft_model.named_parameters() if is_adapter_key(name)}
    share_random_values(theirs, dict(handle.named_parameters()), seed)
    return peft_model, ours, handle


def share_random_values(theirs: dict[str, nn.Parameter], mine: dict[str, nn.Parameter], seed: int) -> None:
    """Add ``NOISE`` * N(0, 1) from ``seed`` (in name order) to PEFT's parameters ``theirs`` and copy
    them into ``mine``, which must have the same names."""
    assert sorted(mine) == sorted(theirs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(theirs):
            theirs[name].add_(noise_like(theirs[name], generator))
            mine[name].copy_(theirs[name])


def noise_like(tensor: torch.Tensor, generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    """``noise`` * N(0, 1) shaped and typed like ``tensor``, drawn from ``generator``."""
    return (noise * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)
