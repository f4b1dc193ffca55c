"""AdaLoRA checkpoints in PEFT's layout, both ways, with PEFT as the oracle.

Twins (``tiny_adalora.peft_twin``) are trained for the whole schedule with ``update_and_allocate`` in
both loops, so their checkpoints hold a ``rank_pattern`` and factors cut to the kept triplets:

* ``handle.save`` writes exactly the tensors and ``rank_pattern`` PEFT's ``save_pretrained`` writes,
  and ``PeftModel.from_pretrained`` reproduces our logits (1e-5);
* PEFT's folder loads here (``attach_adalora(model, path)``, ``load_adapter``) with PEFT's logits and
  PEFT's resized shapes;
* a checkpoint loaded with ``trainable=True`` trains on exactly as PEFT's ``is_trainable=True`` does,
  and one saved mid-allocation goes on allocating its remaining triplets (PEFT's resume raises there);
* ``Trainer`` checkpoints (with ``AdaLoraCallback``) hold the allocated adapter;
* a bad checkpoint raises a clear error and leaves the model as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot
from safetensors.torch import load_file
from shared_fixtures import CausalRows
from tiny_adalora import CASES, TOTAL_STEP, adapter_parameters, peft_twin, sgd_step, train_twins
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from prefix_hooks import AdaLoraAttachment, AdaLoraCallback, AdaLoraConfig, attach, attach_adalora, load_adapter
from prefix_hooks.checkpoint import codec_for_config

ATOL = 1e-5
LR = 0.5
SCHEDULE: dict[str, Any] = {"tinit": 3, "tfinal": 5, "deltaT": 2}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# PEFT's LoRA rank_pattern check does not know AdaLoRA's keys and says so, for its own folders too
PEFT_RANK_PATTERN_WARNING = "ignore:The following rank_pattern keys did not match any targeted module:RuntimeWarning"


def allocated_twins(family: str) -> tuple[Any, PreTrainedModel, AdaLoraAttachment]:
    """PEFT and our twins after the whole schedule: the final rank pattern applied, some triplets pruned."""
    case = CASES[family]
    peft_model, model, handle = peft_twin(case, **SCHEDULE)
    with handle:
        train_twins(case, peft_model, model, handle, range(TOTAL_STEP), LR)
    assert handle.rank_pattern is not None and handle.rank_pattern == peft_model.peft_config["default"].rank_pattern
    assert any(not all(flags) for flags in handle.rank_pattern.values())
    return peft_model, model, handle


def logits(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in CASES[family].inputs(7).items() if k != "labels"}).logits


@pytest.mark.filterwarnings(PEFT_RANK_PATTERN_WARNING)
@pytest.mark.parametrize("family", list(CASES))
def test_our_allocated_checkpoint_is_peft_s_and_loads_in_peft(family: str, tmp_path: Path) -> None:
    peft_model, model, handle = allocated_twins(family)
    with handle:
        ours = logits(model, family)
        handle.save(tmp_path / "ours")
    peft_model.save_pretrained(str(tmp_path / "peft"))
    saved, expected = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "peft" / WEIGHTS)
    assert sorted(saved) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, atol=1e-6, rtol=0, msg=key)  # shapes: the kept triplets
    config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    assert config["rank_pattern"] == json.loads((tmp_path / "peft" / CONFIG).read_text())["rank_pattern"]
    assert all(key.endswith(".lora_E") for key in config["rank_pattern"])
    loaded = peft.PeftModel.from_pretrained(CASES[family].build(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded, family), ours, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings(PEFT_RANK_PATTERN_WARNING)
@pytest.mark.parametrize("family", list(CASES))
def test_peft_s_allocated_checkpoint_loads_here(family: str, tmp_path: Path) -> None:
    peft_model, _, _ = allocated_twins(family)
    peft_model.save_pretrained(str(tmp_path))
    expected = logits(peft_model, family)
    theirs: Any = peft.PeftModel.from_pretrained(CASES[family].build(), str(tmp_path))
    model = CASES[family].build()
    base = logits(model, family)
    with attach_adalora(model, tmp_path) as handle:
        got = logits(model, family)
        shapes = {name: tuple(p.shape) for name, p in handle.named_parameters()}
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert shapes == {name: tuple(p.shape) for name, p in adapter_parameters(theirs).items()}
    assert not any(p.requires_grad for p in handle.parameters())  # loaded frozen
    peft_pattern = theirs.peft_config["default"].rank_pattern  # keys as saved, without the adapter name
    assert handle.rank_pattern == {f"{key}.default": flags for key, flags in peft_pattern.items()}
    assert torch.equal(logits(model, family), base)


def test_checkpoints_before_allocation_round_trip_both_ways(tmp_path: Path) -> None:
    peft_model, model, handle = peft_twin(CASES["gpt2"])
    with handle:
        ours = logits(model, "gpt2")
        handle.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG).read_text())["rank_pattern"] is None
    loaded = peft.PeftModel.from_pretrained(CASES["gpt2"].build(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded, "gpt2"), ours, atol=ATOL, rtol=0)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    again = CASES["gpt2"].build()
    with attach(again, tmp_path / "peft") as group:
        assert isinstance(group.parts[0], AdaLoraAttachment)
        torch.testing.assert_close(logits(again, "gpt2"), logits(peft_model, "gpt2"), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings(PEFT_RANK_PATTERN_WARNING)
def test_a_trainable_load_trains_on_like_peft_is_trainable(tmp_path: Path) -> None:
    """Resume after the allocation: PEFT (``is_trainable=True``, plain SGD: its final-phase masking cannot
    handle the pruned factors) and ours (``trainable=True``, ``update_and_allocate`` at each step, which
    re-applies the rank pattern to the kept triplets) take the same steps."""
    _, _, trained = allocated_twins("llama")
    with trained:
        trained.save(tmp_path)
    case = CASES["llama"]
    theirs: Any = peft.PeftModel.from_pretrained(case.build(), str(tmp_path), is_trainable=True)
    model = case.build()
    resumed = load_adapter(model, tmp_path, trainable=True)
    assert isinstance(resumed, AdaLoraAttachment)
    mine = dict(resumed.named_parameters())
    assert all(p.requires_grad for p in mine.values())
    loaded = {name: p.detach().clone() for name, p in mine.items()}
    expected = adapter_parameters(theirs)
    peft_optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
    theirs.train()
    with resumed:
        model.train()
        optimizer = torch.optim.SGD(resumed.parameters(), lr=LR)
        for step in range(TOTAL_STEP, TOTAL_STEP + 4):
            batch = case.inputs(200 + step)
            sgd_step(theirs, peft_optimizer, batch)
            peft_optimizer.zero_grad()
            sgd_step(model, optimizer, batch)
            resumed.update_and_allocate(step)
            optimizer.zero_grad()
        resumed.save(tmp_path / "again")
    for name, parameter in mine.items():
        torch.testing.assert_close(parameter, expected[name], atol=1e-6, rtol=0, msg=name)
    assert all(not torch.equal(mine[name], loaded[name]) for name in mine if mine[name].numel())  # every factor trained
    again = json.loads((tmp_path / "again" / CONFIG).read_text())["rank_pattern"]
    assert again == json.loads((tmp_path / CONFIG).read_text())["rank_pattern"]


@pytest.mark.filterwarnings(PEFT_RANK_PATTERN_WARNING)
def test_a_checkpoint_saved_mid_allocation_resumes_allocating_its_remaining_triplets(tmp_path: Path) -> None:
    """PEFT's own resume raises here (its final-phase masking meets the resized factors); ours scores the
    triplets the checkpoint kept, counts the pruned ones as masked, and reaches the target budget."""
    case = CASES["llama"]
    peft_model, model, handle = peft_twin(case, **SCHEDULE)
    with handle:
        train_twins(case, peft_model, model, handle, range(12), LR)
        handle.save(tmp_path)
    saved_pattern = json.loads((tmp_path / CONFIG).read_text())["rank_pattern"]
    resumed_model = case.build()
    resumed = load_adapter(resumed_model, tmp_path, trainable=True)
    assert isinstance(resumed, AdaLoraAttachment)
    with resumed:
        resumed_model.train()
        optimizer = torch.optim.SGD(resumed.parameters(), lr=LR)
        for step in range(12, TOTAL_STEP):
            sgd_step(resumed_model, optimizer, case.inputs(100 + step))
            resumed.update_and_allocate(step)
            optimizer.zero_grad()
        final = resumed.saved_rank_pattern()
        expected = logits(resumed_model, "llama")
        resumed.save(tmp_path / "again")
    assert final is not None and sum(sum(flags) for flags in final.values()) <= resumed.budget(TOTAL_STEP)
    for key, flags in final.items():  # a triplet pruned in the checkpoint stays pruned
        assert not any(kept and not before for kept, before in zip(flags, saved_pattern[key]))
    loaded = peft.PeftModel.from_pretrained(case.build(), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(loaded, "llama"), expected, atol=ATOL, rtol=0)


def test_trainer_checkpoints_hold_the_allocated_adapter(tmp_path: Path) -> None:
    """``Trainer(save_strategy="steps")`` with the callback: the last checkpoint is the allocated adapter."""
    case = CASES["llama"]
    model = case.build()
    config = AdaLoraConfig(**{**case.fields, "total_step": 6, "tfinal": 2})
    args = TrainingArguments(
        str(tmp_path),
        max_steps=6,
        save_steps=6,
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="sgd",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
    )
    with attach_adalora(model, config) as handle:
        Trainer(
            model=model, args=args, train_dataset=CausalRows(4, 6, seed=1), callbacks=[AdaLoraCallback(handle)]
        ).train()
        expected = logits(model, "llama")
        pattern = handle.rank_pattern
    loaded = load_adapter(case.build(), tmp_path / "checkpoint-6")
    assert isinstance(loaded, AdaLoraAttachment) and loaded.rank_pattern == pattern
    with loaded:
        torch.testing.assert_close(logits(loaded.model, "llama"), expected, atol=0, rtol=0)


def test_config_round_trips_and_peft_reads_it(tmp_path: Path) -> None:
    schedule: dict[str, Any] = {"init_r": 5, "target_r": 3, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 20}
    scores: dict[str, Any] = {"beta1": 0.8, "beta2": 0.9, "orth_reg_weight": 0.2}
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True] * 5}
    config = AdaLoraConfig(**schedule, **scores, target_modules=["q_proj"], lora_alpha=16, rank_pattern=pattern)
    assert type(codec_for_config(config)).__name__ == "AdaLoraCodec"
    config.save_pretrained(tmp_path)
    assert AdaLoraConfig.from_pretrained(tmp_path) == config
    theirs: Any = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.AdaLoraConfig)
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"):
        assert getattr(theirs, key) == getattr(config, key), key
    assert theirs.rank_pattern == config.rank_pattern


def test_bad_checkpoints_are_refused_before_touching_the_model(tmp_path: Path) -> None:
    _, _, handle = peft_twin(CASES["llama"])
    with handle:
        handle.save(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    fresh = CASES["llama"].build()
    before = snapshot(fresh)
    (tmp_path / CONFIG).write_text(
        json.dumps({**data, "rank_pattern": {"model.layers.0.mlp.up_proj.lora_E": [True] * 6}})
    )
    with pytest.raises(ValueError, match=r"rank_pattern keys \['model.layers.0.mlp.up_proj.lora_E'\] name no target"):
        attach_adalora(fresh, tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**data, "rank_pattern": {"x.lora_E": [True] * 2}}))
    with pytest.raises(ValueError, match=r"rank_pattern\['x.lora_E'\] has 2 entries but init_r=6"):
        attach_adalora(fresh, tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**data, "init_r": 4}))
    with pytest.raises(ValueError, match=r"has shape \(6, 32\); AdaLoRA adapter 'default' needs \(4, 32\)"):
        attach_adalora(fresh, tmp_path)
    assert_untouched(fresh, before)
