"""examples/image_classification_lora.py, run reduced so that it cannot rot.

Claims checked: LoRA (``["query", "value"]``, i.e. q_proj/v_proj) + a trained head copy, trained with the unchanged Trainer,
beats the checkpoint's random head on held-out digits; the printed trainable counts are
``handle.get_nb_trainable_parameters()`` and agree with a count by formula; the model is
bit-identical after the block; a fresh copy of the checkpoint plus the saved folder reproduces
the trained logits exactly, and PEFT loading the same folder gives the same logits; LoRA beats
training the head alone (plain transformers, same steps).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
from shared_fixtures import load_example

from prefix_hooks import LoraConfig, attach
from prefix_hooks.lora import select_targets

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "image_classification_lora.py"
PRETRAIN_STEPS = 150
STEPS = 100
RANK = 8
COUNTS = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)")


def _load_example() -> ModuleType:
    return load_example(EXAMPLE, "image_classification_lora_example")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_example()


def test_the_splits_are_disjoint_and_cover_every_digit(example: ModuleType) -> None:
    train, test = example.load_splits()
    assert (len(train), len(test)) == (1438, 359)  # 1797 images, every fifth held out
    assert train.images.shape == (1438, 1, 32, 32) and test.images.shape == (359, 1, 32, 32)
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    assert set(test.labels.tolist()) == set(range(10)) == set(train.labels.tolist())
    flat_train, flat_test = train.images.flatten(1), test.images.flatten(1)  # (N, 1024)
    # no test image is a training image (the digits set has no exact duplicates across the split)
    assert torch.cdist(flat_test, flat_train).min() > 0


def test_the_old_vit_target_names_select_the_new_modules(example: ModuleType) -> None:
    """transformers 5 renamed ViT's ``query``/``value`` to ``q_proj``/``v_proj``: we match either; PEFT finds nothing."""
    torch.manual_seed(0)
    model = example.ViTForImageClassification(example.vit_config(10))
    common: dict[str, Any] = {"r": RANK, "lora_alpha": 2 * RANK, "modules_to_save": ["classifier"]}
    old = LoraConfig(target_modules=["query", "value"], **common)
    new = LoraConfig(target_modules=["q_proj", "v_proj"], **common)
    assert select_targets(model, old) == select_targets(model, new) != []
    assert all(name.endswith(("attention.q_proj", "attention.v_proj")) for name in select_targets(model, old))
    with pytest.raises(ValueError, match="No modules were targeted"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], **common))


@pytest.mark.slow
def test_reduced_example_trains_restores_and_reloads(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = example.main(["--pretrain-steps", str(PRETRAIN_STEPS), "--steps", str(STEPS), "--rank", str(RANK),
                           "--no-progress", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out

    assert result.pretrain_accuracy >= 0.7, result  # the "pretraining" on digits 0-4 learned something
    assert result.accuracy_before <= 0.25, result  # a random 10-way head: about chance
    assert result.accuracy_after >= 0.5 and result.accuracy_after > result.accuracy_before + 0.3, result
    assert result.accuracy_after_unseen >= 0.3, result  # digits the backbone never saw
    # LoRA adds to what the head alone learns (the baseline is plain transformers, no adapter)
    assert result.accuracy_after >= result.accuracy_head_only + 0.1, result
    assert result.train_losses[-1] < result.train_losses[0], result.train_losses
    assert result.logits_restored and result.model_restored and result.accuracy_outside == result.accuracy_before
    assert result.reload_max_diff == 0.0 and result.accuracy_reloaded == result.accuracy_after

    # counts by formula: LoRA on q_proj and v_proj (64 -> 64) of each layer, plus the head copy (64 -> 10)
    config = example.vit_config(10)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    base_total = sum(p.numel() for p in example.ViTForImageClassification(config).parameters())
    adapter = layers * 2 * RANK * (hidden + hidden) + (hidden * 10 + 10)
    assert result.base_trainable == (base_total, base_total)
    assert result.adapter_trainable == (adapter, base_total + adapter)
    assert result.model_trainable == result.adapter_trainable  # what Trainer optimises is what was printed
    lines = [tuple(int(n.replace(",", "")) for n in match[:2]) for match in COUNTS.findall(printed)]
    assert lines == [result.base_trainable, result.adapter_trainable], printed

    # PEFT loads the saved folder onto the checkpoint and computes the same logits as our reload
    _, test = example.load_splits()
    checkpoint, folder = tmp_path / "checkpoint", tmp_path / "adapter"
    ours_model = example.load_checkpoint(checkpoint, seed=5)
    with attach(ours_model, folder):
        ours = example.predict(ours_model, test)  # (359, 10)
    theirs = example.predict(peft.PeftModel.from_pretrained(example.load_checkpoint(checkpoint, seed=6), folder), test)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert example.accuracy(ours, test) == result.accuracy_after


def test_bad_options_are_refused(example: ModuleType) -> None:
    with pytest.raises(SystemExit):
        example.main(["--steps", "0"])
    with pytest.raises(SystemExit):
        example.main(["--rank", "0"])
