"""Unchanged pipeline code inside ``with attach_prefix(...)``: ``generate()``,
``transformers.pipeline`` and ``transformers.Trainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
import transformers
from shared_fixtures import char_tokenizer, checkpointing_enabled
from tiny_models import VOCAB, build_model, random_batch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Trainer, TrainingArguments

from prefix_hooks import PrefixAttachment, PrefixTuningConfig, attach_prefix, attachments_of

FAMILIES = ("llama", "gpt2")
NUM_VIRTUAL_TOKENS = 4
MAX_NEW_TOKENS = 8
CHILD_PREFIX = "prefix_hooks_default."
# Greedy decoding of a random tiny model likes the pad token; keep generations readable.
GENERATE_KWARGS: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "suppress_tokens": [0, 1, 2]}
NO_DROPOUT: dict[str, dict[str, Any]] = {
    "llama": {"attention_dropout": 0.0},
    "gpt2": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
}


def tiny_model(family: str, attn_implementation: str = "sdpa") -> PreTrainedModel:
    # a larger init than the default makes a prefix visibly change the tiny model's output
    return build_model(family, attn_implementation, initializer_range=0.2, **NO_DROPOUT[family])


def generate(model: PreTrainedModel, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """Greedy ``model.generate`` with :data:`GENERATE_KWARGS` (untyped: transformers' annotations
    reject the causal-LM classes that ``AutoModelForCausalLM`` builds)."""
    return cast(Any, model).generate(**inputs, **GENERATE_KWARGS, **kwargs)


def attach(model: nn.Module, seed: int = 1) -> PrefixAttachment:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS))
    nn.init.normal_(handle.encoder.embedding.weight, generator=torch.Generator().manual_seed(seed))
    return handle


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over the tiny models' vocabulary: ids 3..95 are ``"!"``..``"}"``."""
    return char_tokenizer(VOCAB - 3)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def structure(model: nn.Module) -> dict[str, Any]:
    """What attaching may touch: modules, parameter identity and flags, hooks."""
    return {
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "hooks": [
            (name, list(module._forward_pre_hooks), list(module._forward_hooks))
            for name, module in model.named_modules()
        ],
    }


def assert_restored(model: nn.Module, base_state: dict[str, torch.Tensor], base_structure: dict[str, Any]) -> None:
    assert attachments_of(model) == []
    assert structure(model) == base_structure
    after = clone_state(model)
    assert list(after) == list(base_state)
    changed = [name for name in base_state if not torch.equal(base_state[name], after[name])]
    assert not changed, f"base tensors changed: {changed}"


# --- 1. generate() ------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_inside_block_uses_the_prefix_and_is_restored_after(family: str, attn_implementation: str) -> None:
    model = tiny_model(family, attn_implementation)
    batch = random_batch(2, 7, seed=1, left_pad=[0, 3])
    base = generate(model, batch)
    base_state, base_structure = clone_state(model), structure(model)
    with attach(model):
        output = generate(model, batch, output_logits=True, return_dict_in_generate=True)
        sequences = output.sequences
        # reference: one full forward over the generated text, no cache, the positions generate() uses
        mask = torch.cat([batch["attention_mask"], torch.ones(2, MAX_NEW_TOKENS, dtype=torch.long)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T + new); left padding does not count
        full = model(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
    after = generate(model, batch)

    prompt_len = batch["input_ids"].shape[1]
    assert sequences.shape == (2, prompt_len + MAX_NEW_TOKENS)
    assert torch.equal(sequences[:, :prompt_len], batch["input_ids"])
    assert not torch.equal(sequences, base), "the prefix did not change generation"
    for row in range(2):
        assert not torch.equal(sequences[row], base[row]), f"row {row} ignored the prefix"
    step_logits = torch.stack(output.logits, dim=1)  # (B, new, V)
    torch.testing.assert_close(step_logits, full[:, prompt_len - 1 : -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(after, base)
    assert_restored(model, base_state, base_structure)


# --- 2. pipeline("text-generation") ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_text_generation_pipeline_inside_block_matches_generate(
    family: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = tiny_model(family)
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "prefix"
    inputs = tokenizer(prompt, return_tensors="pt")
    base_text = generator(prompt, **GENERATE_KWARGS)[0]["generated_text"]
    with attach(model):
        text = generator(prompt, **GENERATE_KWARGS)[0]["generated_text"]
        direct = generate(model, dict(inputs))
        fresh_pipeline_text = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)(
            prompt, **GENERATE_KWARGS
        )[0]["generated_text"]
    after_text = generator(prompt, **GENERATE_KWARGS)[0]["generated_text"]

    assert inputs["input_ids"].shape == (1, len(prompt))
    expected = tokenizer.decode(direct[0], skip_special_tokens=True)
    assert len(expected) == len(prompt) + MAX_NEW_TOKENS
    assert text == expected
    assert fresh_pipeline_text == expected
    assert text != base_text
    assert after_text == base_text


# --- 3. Trainer -------------------------------------------------------------------------------


class RepeatedSequence(torch.utils.data.Dataset):
    """The task: continue one fixed sequence (``length`` tokens), ``size`` copies."""

    def __init__(self, size: int = 8, length: int = 12) -> None:
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


@pytest.mark.slow
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_only_the_prefix(family: str, gradient_checkpointing: bool, tmp_path: Path) -> None:
    model = tiny_model(family)
    config_before = model.config.to_dict()
    base_state, base_structure = clone_state(model), structure(model)
    handle = attach(model)
    encoder_before = clone_state(handle.encoder)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=gradient_checkpointing,
    )
    with handle:
        trainer = Trainer(model=model, args=args, train_dataset=RepeatedSequence())
        trainer.train()
        assert trainer.optimizer is not None
        optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        checkpointing_during = checkpointing_enabled(model)

    assert sorted(map(id, optimized)) == sorted(map(id, handle.parameters()))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20
    assert losses[-1] < 0.85 * losses[0], losses
    encoder_after = clone_state(handle.encoder)
    assert all(not torch.equal(encoder_after[name], encoder_before[name]) for name in encoder_before)

    # restored: no adapter module, hook or frozen flag left; base tensors bit-identical
    assert checkpointing_during == gradient_checkpointing == checkpointing_enabled(model)
    if gradient_checkpointing:
        # Trainer's checkpointing hooks the input embedding (enable_input_require_grads); that hook stays
        embedding = model.get_input_embeddings()
        for name, _, hooks in base_structure["hooks"]:
            if model.get_submodule(name) is embedding:
                hooks.extend(hook.id for hook in model._require_grads_hooks)
    assert_restored(model, base_state, base_structure)
    model.eval()
    with torch.no_grad():
        sample = RepeatedSequence()[0]
        logits = model(input_ids=sample["input_ids"][None]).logits
        assert torch.equal(logits, tiny_model(family)(input_ids=sample["input_ids"][None]).logits)
    # Trainer itself writes args.use_cache into the config; nothing else changed
    assert model.config.to_dict() == {**config_before, "use_cache": args.use_cache}
