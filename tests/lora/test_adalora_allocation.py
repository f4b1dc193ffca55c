"""AdaLoRA's rank allocation against PEFT: 30 seeded SGD steps, ``update_and_allocate`` in both loops.

PEFT is the oracle for the scores, masks and ``rank_pattern`` at every step and for the parameters
after training; a hand-written cubic schedule is the oracle for the budget; the ``Trainer`` path
(:class:`AdaLoraCallback`) must equal the hand loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from shared_fixtures import CausalRows
from tiny_adalora import CASES, TOTAL_STEP, adapter_parameters, peft_twin, sgd_step, train_twins
from tiny_models import build_model
from transformers import Trainer, TrainingArguments

from prefix_hooks import AdaLoraCallback, AdaLoraConfig, LoraConfig, attach, attach_adalora

SCHEDULE: dict[str, Any] = {"tinit": 3, "tfinal": 5, "deltaT": 2}
LR = 0.5
PARAM_ATOL = 1e-6
LENGTH = 6


def masks(handle_parameters: Mapping[str, torch.Tensor]) -> dict[str, list[bool]]:
    """Which singular values are zero, per ``lora_E``."""
    return {name: (p == 0).view(-1).tolist() for name, p in handle_parameters.items() if ".lora_E." in name}


@pytest.mark.parametrize("family", list(CASES))
def test_thirty_steps_allocate_like_peft(family: str) -> None:
    case = CASES[family]
    peft_model, model, handle = peft_twin(case, **SCHEDULE)
    theirs = adapter_parameters(peft_model)
    mine = dict(handle.named_parameters())
    patterns = []

    def check(step: int) -> None:
        expected = peft_model.peft_config["default"].rank_pattern
        assert handle.rank_pattern == expected, step
        assert masks(mine) == masks(theirs), step
        patterns.append(expected)

    with handle:
        train_twins(case, peft_model, model, handle, range(TOTAL_STEP), LR, check)
    assert sum(pattern is not None for pattern in patterns) > TOTAL_STEP // 2
    final = handle.rank_pattern
    assert final is not None
    kept = sum(sum(flags) for flags in final.values())
    assert kept <= handle.budget(TOTAL_STEP - SCHEDULE["tfinal"]) == CASES[family].fields["target_r"] * len(final)
    assert any(not all(flags) for flags in final.values())
    for name, parameter in mine.items():
        torch.testing.assert_close(parameter, theirs[name], atol=PARAM_ATOL, rtol=0, msg=name)


def test_budget_follows_the_cubic_schedule() -> None:
    init_r, target_r, tinit, tfinal, total = 6, 2, 4, 6, 40
    model = build_model("llama")
    config = AdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, total_step=total, target_modules=["q_proj"]
    )
    handle = attach_adalora(model, config)
    start, end = init_r * 2, target_r * 2  # two q_proj targets
    for step in range(total + 3):
        if step <= tinit:
            expected = start
        elif step > total - tfinal:
            expected = end
        else:
            progress = (step - tinit) / (total - tfinal - tinit)
            expected = int((start - end) * (1 - progress) ** 3 + end)
        assert handle.budget(step) == expected, step
    assert handle.budget(total - tfinal) == end


def test_a_budget_equal_to_the_rank_masks_nothing() -> None:
    """``init_r == target_r``: every masking step keeps everything (PEFT's ``kthvalue(k=0)`` raises here)."""
    model = build_model("llama")
    handle = attach_adalora(
        model, AdaLoraConfig(init_r=2, target_r=2, total_step=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    batch = CausalRows(2, LENGTH, seed=1).rows[0]
    with handle:
        optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
        for step in range(6):
            sgd_step(model, optimizer, {key: value[None] for key, value in batch.items()})
            handle.update_and_allocate(step)
            optimizer.zero_grad()
    assert handle.rank_pattern is not None
    assert all(all(flags) for flags in handle.rank_pattern.values())


def test_allocation_needs_the_steps_gradients() -> None:
    model = build_model("llama")
    handle = attach_adalora(model, AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    with handle:
        with pytest.raises(RuntimeError, match=r"needs the gradients .* after loss.backward\(\) and before"):
            handle.update_and_allocate(0)
        with pytest.raises(ValueError, match=r"global_step=-1 is not accepted"):
            handle.update_and_allocate(-1)
        with pytest.raises(RuntimeError, match=r"final phase without a rank pattern"):
            handle.update_and_allocate(11)


QUIET_CPU: dict[str, Any] = {
    "use_cpu": True,
    "report_to": [],
    "disable_tqdm": True,
    "logging_strategy": "no",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
}


def _trainer_args(output_dir: Path) -> TrainingArguments:
    """Plain SGD at a constant rate, no clipping or decay: the hand loop's steps."""
    return TrainingArguments(
        str(output_dir),
        max_steps=TOTAL_STEP,
        per_device_train_batch_size=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        seed=0,
        **QUIET_CPU,
    )


def test_trainer_with_the_callback_equals_the_hand_loop(tmp_path: Path) -> None:
    config = AdaLoraConfig(**CASES["llama"].fields, **SCHEDULE)
    rows = CausalRows(1, LENGTH, seed=3)  # one row: every step sees it, whatever the Trainer's sampling
    batch = {key: value[None] for key, value in rows.rows[0].items()}

    hand_model = build_model("llama")
    hand = attach_adalora(hand_model, config)
    hand_patterns = []
    with hand:
        hand_model.train()
        optimizer = torch.optim.SGD(hand.parameters(), lr=LR)
        for step in range(TOTAL_STEP):
            sgd_step(hand_model, optimizer, batch)
            hand.update_and_allocate(step)
            optimizer.zero_grad()
            hand_patterns.append(hand.rank_pattern)

    model = build_model("llama")
    group = attach(model, config)  # the callback takes the group's trainable AdaLoRA part

    class Record(AdaLoraCallback):
        patterns: ClassVar[list[object]] = []

        def on_optimizer_step(self, *args: object, **kwargs: object) -> None:
            super().on_optimizer_step(*args, **kwargs)  # type: ignore[arg-type]
            self.patterns.append(self.handle.rank_pattern)

    recorder = Record(group)
    with group:
        Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=rows, callbacks=[recorder]).train()
    assert recorder.patterns == hand_patterns
    expected = dict(hand.named_parameters())
    for name, parameter in recorder.handle.named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=PARAM_ATOL, rtol=0, msg=name)
    assert any(not all(flags) for flags in hand_patterns[-1].values())  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"AdaLoraCallback needs an AdaLoraAttachment, or a group holding a trainable"):
        AdaLoraCallback(attach(model, LoraConfig(target_modules=["q_proj"])))


def test_the_callback_warns_when_the_trainer_runs_another_step_count(tmp_path: Path) -> None:
    model = build_model("llama")
    handle = attach_adalora(model, AdaLoraConfig(total_step=TOTAL_STEP + 5, target_modules=["q_proj"]))
    args = _trainer_args(tmp_path)
    args.max_steps = 1
    with handle, pytest.warns(UserWarning, match=r"total_step=35 steps, but this Trainer runs 1"):
        Trainer(
            model=model, args=args, train_dataset=CausalRows(1, LENGTH, seed=3), callbacks=[AdaLoraCallback(handle)]
        ).train()
