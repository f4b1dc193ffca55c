"""(IA)^3's attach/detach lifecycle: no trace after detach (also while merged, in bfloat16),
atomic attach, gradients only on the adapter, Trainer, disabled(), and (IA)^3 together with
prefix tuning and with LoRA in one ``attach(model, ...)``.

The no-trace check is the foundation's (``tests/core/test_lifecycle.py``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import peft
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from restoration import (
    ERRORS_EVERYWHERE,
    MANUAL_ACROSS_INTERRUPT,
    NESTED_REATTACH,
    PROGRAMS,
    ProgramRun,
    assert_untouched,
    detach_everything,
    make_warm_model,
    snapshot,
    warm_up,
)
from tiny_encoders import attach_random_prefix
from tiny_ia3 import fold_by_hand, output_of, randomise
from tiny_lora import randomise as randomise_lora
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from prefix_hooks import attach
from prefix_hooks.ia3 import IA3Attachment, IA3Config, attach_ia3
from prefix_hooks.ia3 import scaling as ia3_scaling
from prefix_hooks.lora import LoraConfig, ModulesToSaveWrapper, attach_lora

__all__ = ["make_warm_model"]  # the fixture, imported for pytest

ATOL = 1e-5
SAVED = {"llama": ["lm_head"], "gpt2": ["ln_f"]}


def folded(model: PreTrainedModel, handle: IA3Attachment) -> PreTrainedModel:
    """A deep copy of ``model`` with ``handle``'s vectors multiplied into its weights by hand."""
    oracle = copy.deepcopy(model)
    fold_by_hand(oracle, {t.name: (handle.vector(t.name), t.feedforward) for t in handle.targets})
    return oracle


# --- no trace ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(SAVED))
@given(program=PROGRAMS, attn=st.sampled_from(["eager", "sdpa"]), frozen_mask=st.integers(0, 255), save=st.booleans())
@example(program=NESTED_REATTACH, attn="sdpa", frozen_mask=0b1010, save=True)
@example(program=MANUAL_ACROSS_INTERRUPT, attn="eager", frozen_mask=0b0001, save=False)
@example(program=ERRORS_EVERYWHERE, attn="sdpa", frozen_mask=0b1111_1110, save=True)
def test_detach_leaves_no_trace(
    make_warm_model: Callable[..., PreTrainedModel], family: str, program: list[Any], attn: str,
    frozen_mask: int, save: bool,
) -> None:
    model = make_warm_model(family, attn, frozen_mask=frozen_mask)
    before = snapshot(model)
    handle = attach_ia3(model, IA3Config(modules_to_save=SAVED[family] if save else None))
    randomise(handle)
    assert_untouched(model, before)  # building the handle changes nothing
    try:
        program_run = ProgramRun(model, handle, before)
        program_run.run(program)
        program_run.finish()
    finally:
        detach_everything(model)


@pytest.mark.parametrize("family", list(SAVED))
def test_detach_while_merged_restores_bfloat16_bit_for_bit(family: str) -> None:
    model = build_model(family)
    cast(Any, model).to(torch.bfloat16)  # transformers' decorated .to() confuses mypy
    warm_up(model)
    before = snapshot(model)
    first, second = attach_ia3(model, IA3Config(), "first"), attach_ia3(model, IA3Config(), "second")
    randomise(first, seed=1)
    randomise(second, seed=2)
    batch = random_batch(2, 5)
    with torch.no_grad(), first, second:
        unmerged = output_of(model, batch)
        second.merge()
        first.merge()
        merged = output_of(model, batch)
        second.unmerge()  # first stays merged: the original is restored and first refolded
        first_only_merged = output_of(model, batch)
        second.merge()
    assert_untouched(model, before)  # detached with both merged: the original tensors, bit for bit
    assert (merged.float() - unmerged.float()).abs().max() < 0.1  # bf16 rounding of the merged weights
    assert torch.equal(first_only_merged.isnan(), unmerged.isnan())


def test_original_weights_keep_identity_and_storage_through_merge() -> None:
    model = build_model("gpt2")
    tensors = {name: (id(p), p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    handle = attach_ia3(model, IA3Config())
    randomise(handle)
    with handle:
        handle.merge()
        assert any(not torch.equal(p, tensors[n][2]) for n, p in model.named_parameters() if n in tensors)
    for name, parameter in model.named_parameters():
        identity, pointer, values = tensors[name]
        assert (id(parameter), parameter.data_ptr()) == (identity, pointer)
        assert torch.equal(parameter, values)


# --- atomic attach, errors before mutation --------------------------------------------------------
def test_a_failure_while_attaching_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    handle = attach_ia3(model, IA3Config(modules_to_save=["lm_head"]))
    real = ia3_scaling.acquire
    calls = 0

    def failing(module: nn.Module, entry: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("injected failure")
        return real(module, entry)

    monkeypatch.setattr(ia3_scaling, "acquire", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        handle.attach()
    assert not handle.is_attached
    assert_untouched(model, before)
    monkeypatch.setattr(ia3_scaling, "acquire", real)
    with handle:
        assert isinstance(model.lm_head, ModulesToSaveWrapper)
    assert_untouched(model, before)


def test_errors_are_raised_before_anything_is_mutated() -> None:
    model = build_model("llama")
    warm_up(model)
    first = attach_ia3(model, IA3Config())
    twin = attach_ia3(model, IA3Config())
    with first:
        during = snapshot(model)
        with pytest.raises(RuntimeError, match="adapter named 'default' is already attached"):
            twin.attach()
        assert_untouched(model, during)
        with pytest.raises(RuntimeError, match="is not attached"):
            twin.merge()
        first.merge()
        with pytest.raises(RuntimeError, match="is merged into the base weights; unmerge"), first.disabled():
            pass
        with pytest.raises(RuntimeError, match="merged; unmerge\\(\\) before loading"):
            first.load_peft_state_dict(first.peft_state_dict())
        first.unmerge()
        with first.disabled(), pytest.raises(RuntimeError, match="is disabled here"):
            first.merge()
    stale = attach_ia3(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    model.model.layers[0].self_attn.q_proj = nn.Linear(32, 32)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="'model.layers.0.self_attn.q_proj' is no longer a module of the model"):
        stale.attach()
    assert_untouched(model, before)


# --- training ---------------------------------------------------------------------------------
def test_only_the_adapter_gets_gradients() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config(modules_to_save=["lm_head"]))
    batch = random_batch(2, 6, left_pad=[0, 2])
    with handle:
        model(**batch, labels=batch["input_ids"]).loss.backward()
        adapter = {id(p) for p in handle.parameters()}
        assert {id(p) for p in model.parameters() if p.requires_grad} == adapter
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())


def test_training_while_merged_is_refused() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config())
    batch = random_batch(1, 4)
    with handle:
        handle.merge()
        model(**batch)  # eval mode: fine
        model.train()
        with pytest.raises(RuntimeError, match="merged into this Linear's weight, so it would get no gradient"):
            model(**batch)
        with torch.no_grad():
            model(**batch)
        handle.unmerge()
        model(**batch, labels=batch["input_ids"]).loss.backward()
    frozen = attach_ia3(model, IA3Config(inference_mode=True), "frozen")
    with frozen:
        frozen.merge()
        model(**batch)  # nothing to train: allowed


def test_inference_mode_builds_frozen_vectors() -> None:
    handle = attach_ia3(build_model("llama"), IA3Config(inference_mode=True))
    assert handle.num_trainable_parameters() == 0


class RepeatedSequence(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.input_ids = random_batch(1, 10, seed=3)["input_ids"][0]

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_trainer_trains_exactly_the_vectors_as_peft_does(tmp_path: Path) -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    handle = attach_ia3(model, IA3Config())
    reference_model = peft.get_peft_model(build_model("llama"), peft.IA3Config())
    start = {name: p.detach().clone() for name, p in handle.named_parameters()}

    def arguments(out: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(tmp_path / out), max_steps=15, per_device_train_batch_size=4, learning_rate=0.3,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        )

    with handle:
        trainer = Trainer(model=model, args=arguments("ours"), train_dataset=RepeatedSequence())
        trainer.train()
    reference = Trainer(model=reference_model, args=arguments("peft"), train_dataset=RepeatedSequence())
    reference.train()
    assert trainer.optimizer is not None
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in handle.parameters()}

    def losses(run: Trainer) -> list[float]:
        return [entry["loss"] for entry in run.state.log_history if "loss" in entry]

    history = losses(trainer)
    assert history[-1] < 0.99 * history[0]  # a tiny random LM is near uniform: IA3 moves it slowly (-2.7%)
    assert history == pytest.approx(losses(reference), rel=1e-5)  # the same training run as PEFT's
    assert all(not torch.equal(p, start[name]) for name, p in handle.named_parameters())
    model.eval()
    # Trainer's own traces: args.use_cache written into the config, accelerate's "prepared" mark
    before.parts["config"]["use_cache"] = model.config.use_cache
    del model._is_accelerate_prepared
    assert_untouched(model, before)


# --- disabled() ---------------------------------------------------------------------------------
def test_disabled_gives_base_outputs_in_this_thread_only() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config(modules_to_save=["lm_head"]))
    randomise(handle)
    with torch.no_grad():
        dict(handle.named_parameters())["lm_head.modules_to_save.default.weight"].mul_(1.5)  # differs from lm_head
    batch = random_batch(2, 5)
    results: list[torch.Tensor] = []
    with torch.no_grad():
        base = output_of(model, batch)
        with handle:
            adapted = output_of(model, batch)
            with handle.disabled():
                disabled = output_of(model, batch)
                other = threading.Thread(target=lambda: results.append(model.model(**batch).last_hidden_state))
                other.start()
                other.join()
                here = model.model(**batch).last_hidden_state
            again = output_of(model, batch)
    assert torch.equal(disabled, base)
    assert torch.equal(again, adapted)
    assert not torch.allclose(adapted, base)
    assert not torch.allclose(results[0], here)  # the other thread kept the vectors


# --- with other methods -----------------------------------------------------------------------
def test_prefix_and_ia3_in_one_attach_match_the_folded_oracle() -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    ia3 = attach_ia3(model, IA3Config())
    randomise(ia3)
    oracle = folded(model, ia3)
    batch = random_batch(2, 6, left_pad=[0, 2])
    with torch.no_grad():
        with attach(model, attach_random_prefix(model, 3), ia3):
            ours = output_of(model, batch)
        with attach_random_prefix(oracle, 3):
            expected = output_of(oracle, batch)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert_untouched(model, before)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_ia3_on_the_same_modules_match_the_folded_oracle(lora_first: bool) -> None:
    model = build_model("llama")
    warm_up(model)
    before = snapshot(model)
    lora_config = LoraConfig(r=2, target_modules=["v_proj", "down_proj"], init_lora_weights=False)
    ia3 = attach_ia3(model, IA3Config())  # k_proj, v_proj (regular), down_proj (feed-forward)
    randomise(ia3)
    oracle = folded(model, ia3)  # W * l: LoRA on it computes base(x) * l + lora(x)
    lora = attach_lora(model, lora_config)
    randomise_lora(lora)
    oracle_lora = attach_lora(oracle, lora_config)
    with torch.no_grad():
        for (name, mine), (other, theirs) in zip(lora.named_parameters(), oracle_lora.named_parameters()):
            assert name == other
            theirs.copy_(mine)
    batch = random_batch(2, 6, left_pad=[0, 2])
    parts = [lora, ia3] if lora_first else [ia3, lora]
    with torch.no_grad():
        with attach(model, *parts) as handle:
            ours = output_of(model, batch)
            with handle.disabled():
                base = output_of(model, batch)
        with oracle_lora:
            expected = output_of(oracle, batch)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, base)
    assert_untouched(model, before)


def test_merging_ia3_over_a_merged_lora_update_is_refused() -> None:
    model = build_model("llama")
    lora = attach_lora(model, LoraConfig(r=2, target_modules=["v_proj"]))
    ia3 = attach_ia3(model, IA3Config())
    with lora, ia3:
        lora.merge()
        with pytest.raises(RuntimeError, match="'model.layers.0.self_attn.v_proj' holds a merged LoRA update"):
            ia3.merge()
        lora.unmerge()
        ia3.merge()


def test_trained_vectors_survive_detach_and_reattach() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config())
    randomise(handle)
    batch = random_batch(1, 4)
    with torch.no_grad():
        with handle:
            first = output_of(model, batch)
        with handle:
            second = output_of(model, batch)
    assert torch.equal(first, second)


def test_ia3_config_is_a_registered_method_of_attach() -> None:
    """Needs ``register_method(IA3Config, attach_ia3)`` in ``prefix_hooks/__init__.py``."""
    model = build_model("llama")
    batch = random_batch(2, 5)
    with torch.no_grad(), attach(model, LoraConfig(r=2, target_modules=["q_proj"]), IA3Config()) as handle:
        kinds = [type(part) for part in handle.parts]
        assert output_of(model, batch).shape[0] > 0
    assert IA3Attachment in kinds
