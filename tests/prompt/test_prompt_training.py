"""Training through an attached prompt (prompt tuning, P-tuning MLP and LSTM) on llama, gpt2
and bert sequence classification, with unchanged user code inside ``with attach_prompt(...)``:

* only the adapter's parameters get gradients (base frozen while attached, flags restored after);
* a few AdamW steps lower the loss, and ``transformers.Trainer`` trains exactly the adapter;
* gradient checkpointing (reentrant and not) gives the same gradients as without;
* attach / forward / backward / generate / detach leaves no trace on the model;
* a failing attach (any step) leaves the model untouched; bad input raises before any change.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from shared_fixtures import assert_bitwise_equal, clone_state
from tiny_encoders import NUM_LABELS, build_head, text_batch
from tiny_models import build_model, random_batch
from tiny_seq2seq import build as build_seq2seq
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from prefix_hooks import PrefixTuningConfig, attach_prefix, attachments_of
from prefix_hooks.prompt import PromptAttachment, PromptEncoderConfig, PromptTuningConfig, attach_prompt
from prefix_hooks.prompt import attachment as prompt_attachment

P = 4  # num_virtual_tokens
BSZ = 2
SEQ_LEN = 6
CHILD = "prompt_hooks_default."
FAMILIES = ("llama", "gpt2", "bert")
METHODS: dict[str, Callable[[], PromptTuningConfig | PromptEncoderConfig]] = {
    "prompt-tuning": lambda **more: PromptTuningConfig(num_virtual_tokens=P, **more),
    "p-tuning-mlp": lambda **more: PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=24, **more),
    "p-tuning-lstm": lambda **more: PromptEncoderConfig(
        num_virtual_tokens=P, encoder_reparameterization_type="LSTM", **more
    ),
}
# Dropout off, so train-mode forwards (checkpointing recomputes them) are deterministic.
NO_DROPOUT: dict[str, dict[str, Any]] = {
    "llama": {"attention_dropout": 0.0},
    "gpt2": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
}


def tiny_model(family: str) -> PreTrainedModel:
    """llama / gpt2 causal LM, or bert with a sequence-classification head; eval, float32."""
    if family == "bert":
        return build_head("bert", "sequence")
    return build_model(family, "sdpa", **NO_DROPOUT[family])


def batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch with labels: per-token (causal LM, -100 on padding) or one class per row."""
    if family == "bert":
        text = text_batch("bert", BSZ, seed, length=SEQ_LEN, right_pad=[0, 2])
        return {**text, "labels": torch.arange(BSZ) % NUM_LABELS}
    tokens = random_batch(BSZ, SEQ_LEN, seed=seed, left_pad=[0, 2])
    return {**tokens, "labels": tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)}


def warm(model: nn.Module, family: str) -> None:
    """``warm_up``, plus a forward with labels: bert's head records ``config.problem_type`` then."""
    warm_up(model)
    with torch.no_grad():
        model(**batch(family))


def attach(model: nn.Module, method: str, seed: int = 1, **fields: Any) -> PromptAttachment:
    """A (not yet attached) prompt whose parameters are normal draws from ``seed``."""
    handle = attach_prompt(model, METHODS[method](**fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.prompt_encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return handle


def freeze_some(model: nn.Module) -> dict[str, bool]:
    """Freeze every third base parameter, so restoring flags (not resetting them) is observable."""
    for index, parameter in enumerate(model.parameters()):
        if index % 3 == 1:
            parameter.requires_grad_(False)
    return {name: p.requires_grad for name, p in model.named_parameters()}


def adapter_grads(handle: PromptAttachment) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in handle.prompt_encoder.named_parameters() if p.grad is not None}


# --- 1. gradients reach the adapter and nothing else ------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_parameters_get_gradients(family: str, method: str) -> None:
    model = tiny_model(family)
    flags = freeze_some(model)
    handle = attach(model, method)
    with handle:
        frozen = [name for name, p in model.named_parameters() if name in flags and p.requires_grad]
        output = model(**batch(family))
        output.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
    assert frozen == [], "base parameters must be frozen while attached"
    adapter = {CHILD + name for name, _ in handle.prompt_encoder.named_parameters()}
    assert set(grads) == set(flags) | adapter
    assert [name for name in flags if grads[name] is not None] == []
    for name in adapter:
        grad = grads[name]
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name} got a zero or non-finite gradient"
    # detach restores each flag as it was (not all True) and leaves no gradient on the base
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert dict(handle.prompt_encoder.named_parameters()).keys() == {n.removeprefix(CHILD) for n in adapter}


# --- 2. an optimizer loop and transformers.Trainer -----------------------------------------------


LEARNING_RATE = 2e-1
ADAMW_STEPS = 8


def adamw_losses(model: nn.Module, parameters: list[nn.Parameter], data: dict[str, torch.Tensor]) -> list[float]:
    """The loss before each of ``ADAMW_STEPS`` AdamW steps on ``parameters``, then after the last."""
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    losses = []
    for _ in range(ADAMW_STEPS):
        optimizer.zero_grad()
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(**data).loss.item())
    return losses


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_steps_lower_the_loss_and_leave_the_base_untouched(family: str, method: str) -> None:
    model = tiny_model(family)
    base = clone_state(model)
    handle = attach(model, method)
    with handle:
        losses = adamw_losses(model, list(handle.parameters()), batch(family, seed=3))
    # the tiny random models are nearly uniform, so a prompt can move the loss only a little
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.02, losses
    assert_bitwise_equal(base, clone_state(model))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adamw_training_follows_peft(family: str, method: str) -> None:
    """The same prompt, the same AdamW steps: the same losses as PEFT's training, step by step."""
    model = tiny_model(family)
    handle = attach(model, method, virtual_token_placement="peft")  # the batch is left-padded: PEFT's layout
    peft_model = peft.get_peft_model(tiny_model(family), peft_config(handle))
    peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict())
    data = batch(family, seed=3)
    with handle:
        ours = adamw_losses(model, list(handle.parameters()), data)
    theirs = adamw_losses(peft_model, [p for p in peft_model.parameters() if p.requires_grad], data)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=0)


def peft_config(handle: PromptAttachment) -> Any:
    """PEFT's config of the same (resolved) adapter, for a causal LM."""
    fields = handle.config.to_dict()
    fields.pop("keep_virtual_outputs")
    fields.pop("virtual_token_placement")
    fields["task_type"] = "CAUSAL_LM"
    cls = peft.PromptTuningConfig if isinstance(handle.config, PromptTuningConfig) else peft.PromptEncoderConfig
    return cls(**fields)


class CausalTexts(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Four fixed rows of the causal batch, each its own labels."""

    def __init__(self, family: str) -> None:
        self.rows = batch(family, seed=4)

    def __len__(self) -> int:
        return BSZ

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.rows.items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_only_the_adapter(family: str, method: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    warm(model, family)
    before = snapshot(model)
    base = clone_state(model)
    handle = attach(model, method)
    initial = {name: p.detach().clone() for name, p in handle.prompt_encoder.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=BSZ,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    with handle:  # the user's training code, unchanged
        trainer = Trainer(model=model, args=arguments, train_dataset=CausalTexts(family))
        trainer.train()
    assert trainer.optimizer is not None
    optimized = sorted(id(p) for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimized == sorted(id(p) for p in handle.prompt_encoder.parameters())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, parameter in handle.prompt_encoder.named_parameters():
        assert not torch.equal(parameter, initial[name]), f"{name} did not train"
    model.eval()
    assert_bitwise_equal(base, clone_state(model))
    # Trainer's own traces: args.use_cache written into the config, accelerate's "prepared" mark
    before.parts["config"]["use_cache"] = model.config.use_cache
    vars(model).pop("_is_accelerate_prepared", None)
    assert_untouched(model, before)


# --- 3. gradient checkpointing ---------------------------------------------------------------


def layers_of(model: nn.Module) -> list[nn.Module]:
    """The checkpointed transformer blocks (transformers' GradientCheckpointingLayer)."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def checkpointed_grads(
    family: str, method: str, checkpointing: dict[str, Any] | None
) -> tuple[dict[str, Any], int, int]:
    """Adapter gradients of one train-mode forward/backward, and (layer calls, layers)."""
    model = tiny_model(family).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    handle = attach(model, method)
    layers = layers_of(model)
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    # a block's first submodule runs again on the recompute (the block's own hooks run once)
    hooks = [next(iter(layer.children())).register_forward_pre_hook(count) for layer in layers]
    with handle:
        model(**batch(family)).loss.backward()
    for hook in hooks:
        hook.remove()
    return adapter_grads(handle), calls[0], len(layers)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family: str, method: str, use_reentrant: bool) -> None:
    reference, reference_calls, layers = checkpointed_grads(family, method, None)
    grads, calls, _ = checkpointed_grads(family, method, {"use_reentrant": use_reentrant})
    assert layers == 2 and reference_calls == layers
    assert calls == 2 * layers, "checkpointing must recompute every block"
    assert grads.keys() == reference.keys() and len(grads) == len(list(attach(tiny_model(family), method).parameters()))
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=0, msg=name)


# --- 4. no trace ---------------------------------------------------------------------------------


def generate(model: nn.Module, family: str, **kwargs: Any) -> torch.Tensor:
    tokens = random_batch(BSZ, SEQ_LEN, seed=5, left_pad=[0, 2])
    return model.generate(**tokens, max_new_tokens=3, do_sample=False, pad_token_id=0, **kwargs)  # type: ignore[operator]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attach_forward_generate_detach_leaves_no_trace(family: str, method: str) -> None:
    model = tiny_model(family)
    warm(model, family)
    if family != "bert":
        generate(model, family)  # generate's own lazy state, before the snapshot
    base_logits = model(**batch(family)).logits.detach()
    before = snapshot(model)
    handle = attach(model, method)
    with handle:
        output = model(**batch(family), output_hidden_states=True, output_attentions=True)
        output.loss.backward()
        assert not torch.allclose(output.logits, base_logits, atol=1e-4)  # the prompt acts
        if family != "bert":
            with torch.no_grad():
                cached = generate(model, family)
                uncached = generate(model, family, use_cache=False)
            assert torch.equal(cached, uncached)
    assert_untouched(model, before)
    torch.testing.assert_close(model(**batch(family)).logits, base_logits, rtol=0, atol=0)


# --- 5. atomic attach and bad input ----------------------------------------------------------------


def _raise_after(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` that does its work (pushing its undo), then raises: attach fails midway."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        function(*args, **kwargs)
        raise RuntimeError("injected failure")

    return wrapper


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure")


STEPS = ("freeze_parameters", "register_child", "model_forward_shadow", "base_forward_shadow")


def _raise_on_call(number: int, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, except that its ``number``-th call raises (before doing anything)."""
    calls = itertools.count(1)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == number:
            raise RuntimeError("injected failure")
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def failing_step(step: str, model: nn.Module) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        if step in ("freeze_parameters", "register_child"):
            patch.setattr(prompt_attachment, step, _raise_after(getattr(prompt_attachment, step)))
        elif step == "model_forward_shadow":  # after freezing and registering the module
            patch.setattr(prompt_attachment, "shadow_forward", _raise_on_call(1, prompt_attachment.shadow_forward))
        else:  # the last step: the base model's forward, after the model's
            patch.setattr(prompt_attachment, "shadow_forward", _raise_on_call(2, prompt_attachment.shadow_forward))
        yield


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attach_failing_midway_leaves_the_model_untouched(family: str, method: str, step: str) -> None:
    model = tiny_model(family)
    freeze_some(model)
    warm(model, family)
    before = snapshot(model)
    handle = attach(model, method)
    with failing_step(step, model), pytest.raises(RuntimeError, match="injected failure"):
        handle.attach()
    assert not handle.is_attached and attachments_of(model) == []
    assert_untouched(model, before)
    with handle:  # the same handle attaches cleanly afterwards
        assert handle.is_attached
        model(**batch(family)).loss.backward()
    assert_untouched(model, before)


def test_every_failing_step_is_reached() -> None:
    """The injected failures hit real attach steps (a renamed step would make them vacuous)."""
    for step in STEPS:
        model = tiny_model("llama")
        handle = attach(model, "prompt-tuning")
        with failing_step(step, model), pytest.raises(RuntimeError, match="injected failure"):
            handle.attach()


BAD_CONFIGS: dict[str, tuple[str, Callable[[], Any], type[Exception], str]] = {
    "token_dim": ("llama", lambda: PromptTuningConfig(num_virtual_tokens=P, token_dim=48), ValueError, r"token_dim=48"),
    "two-stacks-on-a-decoder": (
        "gpt2",
        lambda: PromptEncoderConfig(num_virtual_tokens=P, num_transformer_submodules=2),
        ValueError,
        r"num_transformer_submodules=2",
    ),
    "modules_to_save": (
        "bert",
        lambda: PromptTuningConfig(num_virtual_tokens=P, modules_to_save=["no_such_head"]),
        ValueError,
        r"modules_to_save entries \['no_such_head'\] match no module",
    ),
    "prefix-config": ("llama", lambda: PrefixTuningConfig(num_virtual_tokens=P), TypeError, r"PrefixTuningConfig"),
    "sample-vocab-trust-remote-code": (
        "llama",
        lambda: PromptTuningConfig(
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="hi",
            tokenizer_name_or_path="x",
            tokenizer_kwargs={"trust_remote_code": True},
        ),
        ValueError,
        r"trust_remote_code",
    ),
    "vision-model": ("vit", lambda: PromptTuningConfig(num_virtual_tokens=P), ValueError, r"model_type='vit'"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_input_raises_before_anything_changes(case: tuple[str, Callable[[], Any], type[Exception], str]) -> None:
    family, config, error, message = case
    model = build_head("vit", "image") if family == "vit" else tiny_model(family)
    warm_up(model) if family != "vit" else None
    before = snapshot(model)
    with pytest.raises(error, match=message):
        attach_prompt(model, config()).attach()
    assert attachments_of(model) == []
    assert_untouched(model, before)


def test_a_second_prompt_is_refused_while_a_prompt_is_attached() -> None:
    model = tiny_model("llama")
    warm_up(model)
    with attach(model, "prompt-tuning"):
        attached = snapshot(model)
        with pytest.raises(RuntimeError, match=r"already carries the prompt adapter 'default'"):
            attach(model, "p-tuning-lstm").attach()
        assert_untouched(model, attached)


def test_a_prompt_is_refused_while_a_prefix_is_attached() -> None:
    model = tiny_model("llama")
    warm_up(model)
    with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P)):
        attached = snapshot(model)
        with pytest.raises(RuntimeError, match=r"already carries the prefix adapter 'default'"):
            attach(model, "prompt-tuning").attach()
        assert_untouched(model, attached)


def test_a_prefix_is_refused_while_a_prompt_is_attached() -> None:
    model = tiny_model("llama")
    warm_up(model)
    with attach(model, "prompt-tuning"):
        attached = snapshot(model)
        prefix = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
        try:
            with pytest.raises(RuntimeError, match=r"already carries the prompt adapter 'default'"):
                prefix.attach()
        finally:  # a wrongly accepted prefix must come off before the prompt does
            while prefix.is_attached:
                prefix.detach()
        assert attachments_of(model)[-1].adapter_name == "default" and len(attachments_of(model)) == 1
        assert_untouched(model, attached)


def test_per_token_labels_of_the_wrong_length_are_refused() -> None:
    model = tiny_model("llama")
    data = batch("llama")
    data["labels"] = data["labels"][:, 1:]
    with attach(model, "prompt-tuning"), pytest.raises(ValueError, match=r"labels of shape \(2, 5\)"):
        model(**data)


def test_seq2seq_prompt_trains_only_the_adapter() -> None:
    """The encoder-decoder path (prompt in front of the encoder input) trains like the others."""
    model = build_seq2seq("t5")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    handle = attach(model, "prompt-tuning")
    tokens = random_batch(BSZ, SEQ_LEN, seed=6)
    with handle:
        model(**tokens, labels=tokens["input_ids"]).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    grad = handle.prompt_encoder.embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
