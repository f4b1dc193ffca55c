"""DoRA (``LoraConfig(use_dora=True)``) against PEFT's DoRA on identical weights (PEFT is the oracle).

The same tiny model is built twice with the same seed; one copy gets ``peft.get_peft_model``,
the other ``attach_lora``, and PEFT's randomised adapter values (magnitudes included) are
copied into ours by name (``tiny_lora.peft_twin``). Logits, the loss and every adapter
gradient must agree to float32 round-off, in eval and in training with dropout (both sides
draw the same dropout masks from the same seed); a bf16 or fp16 base agrees within its rounding;
merging gives PEFT's merged weights; several active DoRA adapters compose as PEFT's do.
"""

from __future__ import annotations

from typing import Any, cast

import peft
import pytest
import torch
import torch.nn.functional as F
from tiny_lora import DORA_CASES, PEFT_PREFIX, Case, is_adapter_key, output_logits, peft_twin, run, share_random_values
from torch import nn

from prefix_hooks.lora import LoraConfig, LoraLayer, attach_lora

ATOL = 1e-5
MIN_EFFECT = 1e-3  # the adapter must move the outputs by more than this, or parity proves nothing
BF16_ATOL = 1e-2  # logits of order 0.5: a few bf16 ulps (2**-9 there; fp16's are finer); measured: equal
TRAIN_SEED = 11


def labelled(case_id: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with the labels the model's own loss takes (the conv net has no loss: none)."""
    if case_id == "bert-seq-cls":
        return {**inputs, "labels": torch.tensor([0, 2])}
    if case_id == "conv2d":
        return inputs
    return {**inputs, "labels": inputs["input_ids"]}


def loss_of(model: nn.Module, case_id: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one forward; the conv net's loss is cross-entropy against fixed classes."""
    output = model(**labelled(case_id, inputs))
    if case_id == "conv2d":
        return output, F.cross_entropy(output, torch.tensor([1, 3]))
    return output.logits, output.loss


def adapter_grads(named: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): p.grad for name, p in named if is_adapter_key(name) and p.grad is not None}


def forward_backward(
    model: nn.Module, case_id: str, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(TRAIN_SEED)  # the same dropout masks on both sides
    logits, loss = loss_of(model, case_id, inputs)
    loss.backward()
    return logits.detach(), loss.detach()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("case_id", list(DORA_CASES))
def test_logits_loss_and_gradients_equal_peft(case_id: str, train: bool) -> None:
    case = DORA_CASES[case_id]
    if train:  # dropout on the adapters' input: PEFT recomputes the base term on the dropped-out input
        case = Case(case.build, case.inputs, {**case.fields, "lora_dropout": 0.2}, case.peft_only)
    peft_model, ours, handle = peft_twin(case)
    inputs = case.inputs()
    base = run(ours, inputs)
    peft_model.train(train)
    expected_logits, expected_loss = forward_backward(peft_model, case_id, inputs)
    with handle:
        ours.train(train)
        logits, loss = forward_backward(ours, case_id, inputs)
        grads = adapter_grads(ours.named_parameters())
        keys = list(ours.state_dict())
    expected_grads = adapter_grads(peft_model.named_parameters(), PEFT_PREFIX)
    assert (expected_logits - base).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=0)
    assert sorted(grads) == sorted(expected_grads)
    assert any(".lora_magnitude_vector." in name for name in grads)
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=1e-4, msg=name)
    assert keys == [key.removeprefix(PEFT_PREFIX) for key in peft_model.state_dict()]


@pytest.mark.parametrize("case_id", ["llama", "gpt2", "bert-seq-cls"])
def test_trainable_parameters_equal_peft(case_id: str) -> None:
    peft_model, ours, handle = peft_twin(DORA_CASES[case_id])
    with handle:
        trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
        counts = handle.get_nb_trainable_parameters()
    expected = {name.removeprefix(PEFT_PREFIX) for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert {name for name, _ in handle.named_parameters()} >= {n for n in expected if ".lora_magnitude_vector." in n}
    assert counts == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case_id", ["llama", "gpt2", "bert-seq-cls"])
def test_half_precision_base_with_float32_factors_equals_peft(case_id: str, dtype: torch.dtype) -> None:
    """PEFT keeps the factors and magnitude float32 over a bf16/fp16 base (``autocast_adapter_dtype``), as we do."""
    case = DORA_CASES[case_id]
    peft_model, ours, handle = peft_twin(case, dtype=dtype)
    inputs = case.inputs()
    expected = run(peft_model, inputs)
    with handle:
        assert all(p.dtype == torch.float32 for name, p in handle.named_parameters() if ".lora_" in name)
        got = run(ours, inputs)
    assert got.dtype == expected.dtype == dtype
    assert (expected.float() - run(ours, inputs).float()).abs().max() > MIN_EFFECT
    torch.testing.assert_close(got.float(), expected.float(), atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case_id", ["llama", "gpt2", "conv2d"])
def test_merged_weights_equal_peft_s(case_id: str, dtype: torch.dtype) -> None:
    """PEFT's merged weight is ``m / ||W + dW||_c * (W + dW)``; ours equals it, then unmerge restores bit for bit."""
    case = DORA_CASES[case_id]
    peft_model, ours, handle = peft_twin(case, dtype=dtype)
    originals = [(p, p.detach().clone()) for p in ours.parameters()]
    inputs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in case.inputs().items()}
    with handle:
        unmerged = run(ours, inputs)
        handle.merge()
        merged = run(ours, inputs)
        weights = {key: value.clone() for key, value in ours.state_dict().items() if ".base_layer." in key}
        handle.unmerge()
        assert all(torch.equal(p, value) for p, value in originals)
    peft_model.merge_adapter()
    theirs = peft_model.state_dict()
    assert weights
    for key, weight in weights.items():
        bf16 = dtype == torch.bfloat16  # within one bf16 rounding (2**-8 relative); measured: equal
        atol, rtol = (0.0, 2**-8) if bf16 else (ATOL, 0.0)
        torch.testing.assert_close(weight, theirs[PEFT_PREFIX + key], atol=atol, rtol=rtol)
    if dtype == torch.float32:
        torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged, run(peft_model, inputs), atol=ATOL, rtol=0)


def two_adapter_peft(case: Case, second: dict[str, Any]) -> tuple[peft.PeftModel, nn.Module, list[Any]]:
    """PEFT and our model, each with adapter ``first`` (``case``) and ``second`` (``case`` with
    ``second`` changed), both active in that order, with equal random values."""
    peft_model, ours, first = peft_twin(case, adapter_name="first")
    fields = {**case.fields, **second}
    peft_model.add_adapter("second", peft.LoraConfig(**fields, **case.peft_only))
    cast(Any, peft_model.base_model).set_adapter(["first", "second"])
    other = attach_lora(ours, LoraConfig(**fields), adapter_name="second")
    theirs = {name.removeprefix(PEFT_PREFIX): p for name, p in peft_model.named_parameters() if ".second" in name}
    share_random_values(theirs, dict(other.named_parameters()), seed=9)
    return peft_model.eval(), ours, [first, other]


@pytest.mark.parametrize("second", [{"use_dora": True, "r": 2}, {"use_dora": False}], ids=["dora-dora", "dora-lora"])
def test_several_active_adapters_compose_as_peft(second: dict[str, Any]) -> None:
    """Each adapter acts on the output accumulated so far (a DoRA adapter rescales it), in the active
    order, as PEFT's; merging them in that order gives the same model."""
    case = DORA_CASES["llama"]
    peft_model, ours, handles = two_adapter_peft(case, second)
    inputs = case.inputs()
    expected = run(peft_model, inputs)
    with handles[0], handles[1]:
        got = run(ours, inputs)
        for handle in handles:
            handle.merge()
        merged = run(ours, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged, expected, atol=ATOL, rtol=0)
    with handles[0]:
        alone = run(ours, inputs)
    assert (alone - expected).abs().max() > MIN_EFFECT  # the second adapter matters


def test_layers_hold_peft_s_magnitude_shapes() -> None:
    shapes = {}
    for case_id in ("llama", "gpt2", "conv2d"):
        _, ours, handle = peft_twin(DORA_CASES[case_id])
        with handle:
            for name, module in ours.named_modules():
                if isinstance(module, LoraLayer):
                    magnitude = module.lora_magnitude_vector["default"].get_parameter("weight")
                    shapes[f"{case_id}:{name.rsplit('.', 1)[-1]}"] = tuple(magnitude.shape)
    assert shapes["llama:q_proj"] == (32,) and shapes["llama:down_proj"] == (32,) and shapes["llama:v_proj"] == (16,)
    assert shapes["llama:embed_tokens"] == (32,)  # one per embedding dimension
    assert shapes["gpt2:c_attn"] == (96,) and shapes["gpt2:c_fc"] == (128,)  # Conv1D: out features
    assert shapes["conv2d:conv1"] == (1, 8, 1, 1) and shapes["conv2d:head"] == (5,)


def test_peft_refuses_per_row_adapters_with_dora_and_ours_gives_each_row_its_own() -> None:
    """PEFT raises for ``adapter_names`` with DoRA; ours gives each row what that adapter alone gives."""
    case = DORA_CASES["llama"]
    peft_model, ours, handles = two_adapter_peft(case, {"use_dora": True, "r": 2})
    inputs = {key: value[:1].repeat(3, 1) for key, value in case.inputs().items()}
    rows = ["second", "__base__", "first"]
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        peft_model(**inputs, adapter_names=rows)
    base = run(ours, inputs)
    with handles[0], handles[1]:
        mixed = output_logits(ours(**inputs, adapter_names=rows)).detach()
        alone = {}
        for handle in handles:
            handle.activate()
            alone[handle.adapter_name] = run(ours, inputs)
    torch.testing.assert_close(mixed[0], alone["second"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], alone["first"][2], atol=ATOL, rtol=0)
    assert (alone["first"][0] - alone["second"][0]).abs().max() > MIN_EFFECT
