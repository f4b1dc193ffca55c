"""A saved adapter with ``modules_to_save``, loaded and saved again, writes the same files.

Every method that takes ``modules_to_save`` (LoRA, IA3, prefix, prompt tuning, P-tuning), on a
sequence-classification model whose ``task_type`` also implies the head. Oracles: the first
save's bytes (ours -> ours -> ours), and PEFT itself (PEFT's folder -> ours -> ours keeps its
``modules_to_save``, and PEFT loads both folders to the same logits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from tiny_encoders import build_head, text_batch
from torch import nn

from prefix_hooks import (
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.checkpoint import load_adapter, save_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
EXTRA = "prefix_hooks_extra.safetensors"

METHODS: dict[str, Callable[[nn.Module, dict[str, Any]], Attachment]] = {
    "lora": lambda model, fields: attach_lora(model, LoraConfig(r=4, target_modules=["query", "value"], **fields)),
    "ia3": lambda model, fields: attach_ia3(model, IA3Config(**fields)),
    "prefix": lambda model, fields: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, **fields)),
    "prompt": lambda model, fields: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3, **fields)),
    "p-tuning": lambda model, fields: attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3, **fields)),
}
MODULES_TO_SAVE = [
    ["classifier"],  # the head the task type implies, named as well
    ["classifier", "bert.pooler.dense"],  # and a module the task type does not imply
]


def _randomise(parameters: list[nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS, EXTRA) if (folder / name).is_file()}


@pytest.mark.parametrize("modules_to_save", MODULES_TO_SAVE, ids=["implied-head", "head-and-pooler"])
@pytest.mark.parametrize("method", list(METHODS))
def test_saving_a_loaded_adapter_again_writes_the_same_files(
    tmp_path: Path, method: str, modules_to_save: list[str]
) -> None:
    model = build_head("bert", "sequence")
    handle = METHODS[method](model, {"task_type": "SEQ_CLS", "modules_to_save": modules_to_save})
    _randomise(list(handle.parameters()), seed=4)
    save_adapter(handle, tmp_path / "first")
    assert json.loads((tmp_path / "first" / CONFIG).read_text())["modules_to_save"] == modules_to_save

    loaded = load_adapter(build_head("bert", "sequence"), tmp_path / "first", trainable=True)
    assert sorted(name for name, _ in loaded.named_parameters()) == sorted(name for name, _ in handle.named_parameters())
    save_adapter(loaded, tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tmp_path / "first")  # byte for byte, the config included


def test_attach_lora_from_a_folder_keeps_modules_to_save(tmp_path: Path) -> None:
    """``attach_lora(model, folder)`` loads the inference form: the config differs only in ``inference_mode``."""
    model = build_head("bert", "sequence")
    handle = METHODS["lora"](model, {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]})
    _randomise(list(handle.parameters()), seed=4)
    save_adapter(handle, tmp_path / "first")
    save_adapter(attach_lora(build_head("bert", "sequence"), tmp_path / "first"), tmp_path / "again")
    first, again = (json.loads((tmp_path / name / CONFIG).read_text()) for name in ("first", "again"))
    assert (first.pop("inference_mode"), again.pop("inference_mode")) == (False, True)
    assert again == first
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (tmp_path / "first" / WEIGHTS).read_bytes()


PEFT_METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: peft.LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["query", "value"], feedforward_modules=[], modules_to_save=["classifier"], task_type="SEQ_CLS"
    ),
    "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["classifier"], task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_a_peft_folder_saved_again_keeps_its_modules_to_save(tmp_path: Path, method: str) -> None:
    """PEFT writes the task heads into ``modules_to_save`` (``["classifier", "classifier", "score"]``
    for LoRA); we keep them, without repeats where our config class drops repeats, and PEFT loads
    both folders to the same logits."""
    peft_model = peft.get_peft_model(build_head("bert", "sequence"), PEFT_METHODS[method]()).eval()
    _randomise([p for p in peft_model.parameters() if p.requires_grad], seed=4)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    theirs = json.loads((tmp_path / "peft" / CONFIG).read_text())["modules_to_save"]
    assert "score" in theirs  # PEFT wrote the implied heads, one of which this bert model lacks

    save_adapter(load_adapter(build_head("bert", "sequence"), tmp_path / "peft", trainable=True), tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / CONFIG).read_text())["modules_to_save"]
    assert ours == (theirs if method == "prompt" else list(dict.fromkeys(theirs)))

    inputs = text_batch("bert", batch=2, seed=1)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        for folder in ("peft", "ours"):
            reloaded = peft.PeftModel.from_pretrained(build_head("bert", "sequence"), str(tmp_path / folder)).eval()
            torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=0)
