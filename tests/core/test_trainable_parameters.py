"""``print_trainable_parameters()`` / ``get_nb_trainable_parameters()`` match PEFT's for every method.

The oracle is PEFT's own report on an identical base model: the printed line is compared
character for character, inside the block (where task heads are trained as copies, as in
PEFT's model) and, for methods without such copies, also before the first attach.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
import pytest
import tiny_encoders
import tiny_models
from torch import nn

from prefix_hooks import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, attach
from prefix_hooks.core.attachment import Attachment

Build = Callable[[], nn.Module]


def llama() -> nn.Module:
    return tiny_models.build_model("llama")


def bert_seq_cls() -> nn.Module:
    return tiny_encoders.build("bert")


# name -> (base builder, our config, PEFT's config, whether our report equals PEFT's before attaching)
CASES: dict[str, tuple[Build, Any, Any, bool]] = {
    "prefix": (
        llama,
        PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        True,
    ),
    "prefix-projection-seq-cls": (
        bert_seq_cls,
        PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, task_type="SEQ_CLS"),
        peft.PrefixTuningConfig(
            num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, task_type="SEQ_CLS"
        ),
        False,
    ),
    "prompt-random": (
        llama,
        PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
        True,
    ),
    "p-tuning-mlp": (
        llama,
        PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=24, task_type="CAUSAL_LM"),
        peft.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=24, task_type="CAUSAL_LM"),
        True,
    ),
    "p-tuning-lstm-seq-cls": (
        bert_seq_cls,
        PromptEncoderConfig(
            num_virtual_tokens=5, encoder_hidden_size=24, encoder_reparameterization_type="LSTM", task_type="SEQ_CLS"
        ),
        peft.PromptEncoderConfig(
            num_virtual_tokens=5, encoder_hidden_size=24, encoder_reparameterization_type="LSTM", task_type="SEQ_CLS"
        ),
        False,
    ),
    "ia3": (
        llama,
        IA3Config(task_type="CAUSAL_LM"),
        peft.IA3Config(task_type="CAUSAL_LM"),
        True,
    ),
    "lora-modules-to-save": (
        bert_seq_cls,
        LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
        peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"),
        False,
    ),
}


def report(call: Callable[[], None], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    call()
    return capsys.readouterr().out


@pytest.mark.parametrize("case", CASES)
def test_report_matches_peft(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    build, ours, theirs, equal_before = CASES[case]
    peft_model = peft.get_peft_model(build(), theirs)
    expected = report(peft_model.print_trainable_parameters, capsys)
    assert expected.startswith("trainable params: ") and expected.count("||") == 2

    handle: Attachment = attach(build(), ours)
    if equal_before:
        assert report(handle.print_trainable_parameters, capsys) == expected
    with handle:
        assert handle.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
        assert report(handle.print_trainable_parameters, capsys) == expected
    # after detaching, the adapter's own parameters are reported again (nothing of the model is trainable)
    trainable, _ = handle.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in handle.parameters() if p.requires_grad)


def test_combined_methods_count_every_part_once(capsys: pytest.CaptureFixture[str]) -> None:
    """LoRA + IA3 in one block: PEFT cannot combine them in one model, so the oracle is the sum of
    each method's PEFT count over the shared base."""
    lora = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ia3 = peft.get_peft_model(llama(), peft.IA3Config(task_type="CAUSAL_LM"))
    base_total = sum(p.numel() for p in llama().parameters())
    lora_trainable, lora_total = lora.get_nb_trainable_parameters()
    ia3_trainable, ia3_total = ia3.get_nb_trainable_parameters()
    expected = (lora_trainable + ia3_trainable, lora_total + ia3_total - base_total)

    handle = attach(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), IA3Config(task_type="CAUSAL_LM"))
    with handle:
        assert handle.get_nb_trainable_parameters() == expected
        trainable, total = expected
        line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
        assert report(handle.print_trainable_parameters, capsys) == line


def quantise_queries(model: nn.Module) -> nn.Module:
    """Replace every ``q_proj`` by a bitsandbytes 4-bit linear holding the same weights."""
    import bitsandbytes as bnb  # a test dependency: a missing install fails here rather than skipping
    for name, module in list(model.named_modules()):
        if name.endswith("q_proj") and isinstance(module, nn.Linear):
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None, quant_type="nf4"
            )
            layer.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to() quantises
    return model


def test_four_bit_weights_count_as_peft_counts_them(capsys: pytest.CaptureFixture[str]) -> None:
    peft_model = peft.get_peft_model(quantise_queries(llama()), peft.LoraConfig(r=4, target_modules=["o_proj"]))
    expected = report(peft_model.print_trainable_parameters, capsys)
    handle = attach(quantise_queries(llama()), LoraConfig(r=4, target_modules=["o_proj"]))
    assert any(type(p).__name__ == "Params4bit" for p in handle.model.parameters())
    with handle:
        assert report(handle.print_trainable_parameters, capsys) == expected
