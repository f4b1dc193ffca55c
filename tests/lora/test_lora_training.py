"""Training with ``transformers.Trainer`` inside ``with attach_lora(...)``: the optimizer gets
exactly the adapter's parameters (LoRA factors and modules-to-save copies), the loss falls,
and afterwards the base model is bit-for-bit what it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_encoders import NUM_LABELS, text_batch
from tiny_encoders import build as build_encoder
from tiny_models import build_model, random_batch
from torch import nn
from transformers import Trainer, TrainingArguments

from prefix_hooks.lora import LoraAttachment, LoraConfig, attach_lora

STEPS = 20
BATCH = 4
CAUSAL_LR = 1e-2  # the tiny random LM learns slowly, with PEFT too: ~12% lower loss in 20 steps
CLASSIFIER_LR = 5e-2


class RepeatedSequence(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Causal LM task: continue one fixed sequence; ``size`` copies."""

    def __init__(self, size: int = 8, length: int = 10) -> None:
        self.input_ids = random_batch(1, length, seed=3)["input_ids"][0]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids.clone(),
            "attention_mask": torch.ones_like(self.input_ids),
            "labels": self.input_ids.clone(),
        }


class LabelledTexts(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequence classification task: 8 fixed texts with fixed labels."""

    def __init__(self) -> None:
        self.batch = text_batch("bert", batch=8, seed=4)
        self.labels = torch.arange(8) % NUM_LABELS

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{k: v[index] for k, v in self.batch.items()}, "labels": self.labels[index]}


def arguments(out: Path, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=learning_rate,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )


def train(
    model: nn.Module, handle: LoraAttachment, dataset: torch.utils.data.Dataset[dict[str, torch.Tensor]], out: Path,
    learning_rate: float,
) -> Trainer:
    with handle:
        trainer = Trainer(model=model, args=arguments(out, learning_rate), train_dataset=dataset)
        trainer.train()
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def optimized_ids(trainer: Trainer) -> list[int]:
    assert trainer.optimizer is not None
    return sorted(id(p) for group in trainer.optimizer.param_groups for p in group["params"])


def test_trainer_trains_only_lora_on_a_causal_lm(tmp_path: Path) -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    fields: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    handle = attach_lora(model, LoraConfig(**fields))
    peft_model = peft.get_peft_model(build_model("llama"), peft.LoraConfig(**fields))
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if ".lora_" in n}
    with torch.no_grad():  # the same initial adapter (PEFT's random A, zero B)
        for name, parameter in handle.named_parameters():
            parameter.copy_(theirs[name])
    initial = {name: p.detach().clone() for name, p in handle.named_parameters()}
    trainer = train(model, handle, RepeatedSequence(), tmp_path / "ours", CAUSAL_LR)
    assert optimized_ids(trainer) == sorted(id(p) for p in handle.parameters())
    history = losses(trainer)
    assert len(history) == STEPS
    assert history[-1] < 0.9 * history[0], history
    reference = Trainer(model=peft_model, args=arguments(tmp_path / "peft", CAUSAL_LR), train_dataset=RepeatedSequence())
    reference.train()
    assert history == pytest.approx(losses(reference), rel=1e-4)  # the same training run as PEFT's
    changed = {name for name, p in handle.named_parameters() if not torch.equal(p, initial[name])}
    assert {name for name in changed if ".lora_B." in name} == {name for name in initial if ".lora_B." in name}
    model.eval()
    # Trainer's own traces: args.use_cache written into the config, accelerate's "prepared" mark
    before.parts["config"]["use_cache"] = model.config.use_cache
    del model._is_accelerate_prepared
    assert_untouched(model, before)


def test_trainer_trains_lora_and_the_classifier_copy(tmp_path: Path) -> None:
    model = build_encoder("bert")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    handle = attach_lora(model, config)
    head = {name: p.detach().clone() for name, p in model.get_submodule("classifier").named_parameters()}
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = train(model, handle, LabelledTexts(), tmp_path, CLASSIFIER_LR)
    optimized = optimized_ids(trainer)
    assert optimized == sorted(id(p) for p in handle.parameters())
    copies = [p for name, p in handle.named_parameters() if ".modules_to_save." in name]
    assert len(copies) == 2 and all(id(p) in optimized for p in copies)
    history = losses(trainer)
    assert history[-1] < 0.85 * history[0], history
    for name, value in head.items():  # the copy trained; the original head did not
        assert torch.equal(model.get_submodule("classifier").get_parameter(name), value)
        assert not torch.equal(dict(handle.named_parameters())[f"classifier.modules_to_save.default.{name}"], value)
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters())
