"""A prompt-learning adapter saved without a ``task_type`` still works in PEFT.

PEFT loads a folder whose config has no task type as a bare ``PeftModel``, whose forward never
applies a prefix or a prompt: the base model's logits, silently. Saving therefore names the
generative task (``CAUSAL_LM`` / ``SEQ_2_SEQ_LM``) when the config has none. Oracle: PEFT's
logits from our folder equal ours, and differ from the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import tiny_encoders
import tiny_models
import torch
from shared_fixtures import bridge_peft_cache_keyword

from prefix_hooks import PrefixTuningConfig, PromptTuningConfig, attach, attach_prefix, attach_prompt
from prefix_hooks.core.attachment import Attachment

P = 3


def randomised(handle: Attachment, seed: int = 4) -> Attachment:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return handle


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_peft_applies_an_adapter_saved_without_task_type(family: str, method: str, tmp_path: Path) -> None:
    model = tiny_models.build_model(family)
    config = PrefixTuningConfig(num_virtual_tokens=P) if method == "prefix" else PromptTuningConfig(num_virtual_tokens=P)
    assert config.task_type is None
    built = attach_prefix(model, config) if isinstance(config, PrefixTuningConfig) else attach_prompt(model, config)
    handle = randomised(built)
    handle.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    batch = tiny_models.random_batch(2, 6, seed=1)
    with torch.no_grad():
        base = model(**batch).logits
        with handle:
            ours = model(**batch).logits
        peft_model = bridge_peft_cache_keyword(
            peft.PeftModel.from_pretrained(tiny_models.build_model(family), str(tmp_path)).eval()
        )
        theirs = peft_model(**batch).logits
        reloaded = attach(tiny_models.build_model(family), tmp_path)
        with reloaded:
            again = reloaded.model(**batch).logits
    if method == "prompt":
        theirs = theirs[:, P:]  # PEFT keeps the virtual positions in the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3
    assert torch.equal(again, ours)


def test_a_classifier_keeps_no_task_type(tmp_path: Path) -> None:
    """Other tasks imply task heads, so a config without a task type is saved as it is."""
    handle = attach_prefix(tiny_encoders.build("bert"), PrefixTuningConfig(num_virtual_tokens=P))
    handle.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
