"""The Trainer path: checkpoints written by ``Trainer(save_strategy="steps")`` inside an attached
block load back with ``load_adapter(model, "…/checkpoint-N")``, with unchanged training code
(attached models' ``save_pretrained`` writes the adapter too) or with ``SaveAdapterCallback``.

Oracles: the adapter's parameters recorded at each save (bit for bit), and the Trainer's own
``model.safetensors`` of the same checkpoint, which holds the live adapter tensors under the
model's parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from shared_fixtures import CausalRows
from tiny_models import build_model, random_batch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from prefix_hooks import IA3Config, LoraConfig, PrefixTuningConfig, attach_ia3, attach_lora, attach_prefix
from prefix_hooks.checkpoint import SaveAdapterCallback, load_adapter
from prefix_hooks.core.attachment import Attachment

STEPS = 4
SAVE_STEPS = 2
BATCH = 2
LENGTH = 6

METHODS: dict[str, Callable[[nn.Module], Attachment]] = {
    "lora": lambda model: attach_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
    "ia3": lambda model: attach_ia3(model, IA3Config()),
    "prefix": lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)),
}


def _examples(count: int) -> CausalRows:
    return CausalRows(count, LENGTH, seed=5)


class _Recorder(TrainerCallback):
    """Copies the adapter's parameters at every save (the expected checkpoint content)."""

    def __init__(self, handle: Attachment) -> None:
        self.handle = handle
        self.saved: dict[int, list[torch.Tensor]] = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.saved[state.global_step] = [p.detach().clone() for p in self.handle.parameters()]
        return control


def _train(
    model: nn.Module, handle: Attachment, output_dir: Path, callback: bool = True
) -> tuple[_Recorder, dict[int, str]]:
    recorder = _Recorder(handle)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    with handle:
        live_names = {id(p): name for name, p in model.named_parameters()}
        keys = {index: live_names[id(p)] for index, p in enumerate(handle.parameters())}
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_examples(BATCH * STEPS),
            callbacks=[SaveAdapterCallback(handle), recorder] if callback else [recorder],
        )
        trainer.train()
    return recorder, keys


@pytest.mark.parametrize("callback", [True, False], ids=["callback", "unchanged-code"])
@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_checkpoints_load_back_exactly(tmp_path: Path, method: str, callback: bool) -> None:
    model = build_model("llama")
    handle = METHODS[method](model)
    recorder, live_keys = _train(model, handle, tmp_path, callback)
    model.eval()
    assert sorted(recorder.saved) == [SAVE_STEPS, STEPS]
    assert not torch.equal(recorder.saved[SAVE_STEPS][0], recorder.saved[STEPS][0])  # it did train
    for step, expected in recorder.saved.items():
        folder = tmp_path / f"checkpoint-{step}"
        trainer_state = load_file(folder / "model.safetensors")  # the Trainer's whole-model file
        for index, tensor in enumerate(expected):
            assert torch.equal(trainer_state[live_keys[index]], tensor), live_keys[index]
        fresh = build_model("llama")
        for trainable in (False, True):
            loaded = load_adapter(fresh, folder, trainable=trainable)
            got = list(loaded.parameters())
            assert len(got) >= 1
            if trainable:
                assert len(got) == len(expected)
                for ours, theirs in zip(got, expected, strict=True):
                    assert torch.equal(ours, theirs)
            with torch.no_grad(), loaded:
                loaded_logits = fresh(**random_batch(2, 5, seed=9)).logits
            with torch.no_grad():
                for parameter, value in zip(handle.parameters(), expected, strict=True):
                    parameter.copy_(value)
                with handle:
                    torch.testing.assert_close(
                        loaded_logits, model(**random_batch(2, 5, seed=9)).logits, rtol=0, atol=1e-5
                    )


def test_a_trainer_checkpoint_without_the_callback_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"Trainer checkpoint: pass callbacks=\[SaveAdapterCallback\(handle\)\]"
    ):
        load_adapter(build_model("llama"), tmp_path)


def test_save_pretrained_writes_the_adapters_only_while_attached(tmp_path: Path) -> None:
    """Inside the block ``model.save_pretrained`` writes the model and the attached adapters
    (one subfolder each when several are attached); outside it is the class's own method."""
    from restoration import assert_untouched, snapshot

    from prefix_hooks import attach

    model = build_model("llama")
    model.save_pretrained(tmp_path / "warm")  # transformers records config.architectures / dtype on a save
    before = snapshot(model)
    prefix = METHODS["prefix"](model)
    lora = METHODS["lora"](model)
    with attach(model, prefix, lora):
        model.save_pretrained(tmp_path / "both")
    with prefix:
        model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "none")
    assert_untouched(model, before)
    assert "save_pretrained" not in vars(model)
    assert (tmp_path / "one" / "adapter_config.json").is_file() and (tmp_path / "one" / "model.safetensors").is_file()
    assert not (tmp_path / "none" / "adapter_config.json").exists()
    loaded = load_adapter(build_model("llama"), tmp_path / "both")
    assert sorted(type(part).__name__ for part in loaded.parts) == ["LoraAttachment", "PrefixAttachment"]  # type: ignore[attr-defined]
    one = load_adapter(build_model("llama"), tmp_path / "one", trainable=True)
    for ours, saved in zip(prefix.parameters(), one.parameters(), strict=True):
        assert torch.equal(ours, saved)
