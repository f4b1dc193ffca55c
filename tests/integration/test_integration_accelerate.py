"""accelerate: ``Accelerator.prepare`` under torchrun, and big-model dispatch with CPU / disk offload.

Oracles: one process on the whole global batch (training), and the same adapter (identical
weights) on the model that was never dispatched (outputs, gradients, greedy generation).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from test_integration_distributed import EXAMPLE, STEPS, TOL, load_results, run_single, torchrun
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import (
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.lora.layers import LoraLayer

ACCELERATE_METHODS = ("lora", "prefix")
P = 3
NEW_TOKENS = 4
ATTACH: dict[str, Callable[[nn.Module], Attachment]] = {
    "prefix": lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P)),
    "lora": lambda model: attach_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    "prompt": lambda model: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P)),
    "ia3": lambda model: attach_ia3(model, IA3Config(init_ia3_weights=False)),
}
DISK_MAP = {  # layer 1 (every weight of it) lives in a folder on disk, the rest in memory
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
    "model.rotary_emb": "cpu", "lm_head": "cpu",
}


# --- Accelerator.prepare under torchrun ------------------------------------------------
@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("accelerate")
    torchrun(EXAMPLE, out, "--mode", "accelerate", "--method", *ACCELERATE_METHODS)
    return out


@pytest.fixture(scope="module")
def accelerate_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_single(tmp_path_factory.mktemp("single"), ACCELERATE_METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", ACCELERATE_METHODS)
def test_accelerator_prepare_trains_the_adapter_like_one_process(
    accelerate_run: Path, accelerate_single: Path, method: str
) -> None:
    first, second = load_results(accelerate_run, method)
    reference = torch.load(accelerate_single / method / "single.pt")
    adapter_numel = sum(tensor.numel() for tensor in reference["adapter"].values())
    for name, expected in reference["adapter"].items():
        assert torch.equal(first["adapter"][name], second["adapter"][name]), f"{method}: ranks differ on {name}"
        torch.testing.assert_close(first["adapter"][name], expected, rtol=0, atol=TOL)
    assert [sum(buckets) for buckets in first["buckets"]] == [adapter_numel] * STEPS  # prepare() wrapped in DDP
    rank_mean = (torch.tensor(first["losses"]) + torch.tensor(second["losses"])) / 2
    torch.testing.assert_close(rank_mean, torch.tensor(reference["losses"]), rtol=0, atol=TOL)


# --- big-model dispatch ---------------------------------------------------------------
def dispatched(kind: str, offload_dir: Path) -> PreTrainedModel:
    """The tiny llama under accelerate's hooks: every weight offloaded (``cpu_offload``), or layer 1 on disk."""
    model = build_model("llama")
    if kind == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    return dispatch_model(model, device_map=DISK_MAP, main_device="cpu", offload_dir=str(offload_dir))


def hook_state(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Per module path: the module object, its accelerate hook, its hook-installed forward and offload map."""
    state = {}
    for name, module in model.named_modules():
        hook = module.__dict__.get("_hf_hook")
        state[name] = (module, hook, module.__dict__.get("forward"), getattr(hook, "weights_map", None))
    return state


def same_objects(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    if before.keys() != after.keys():
        return [f"module paths differ: {sorted(set(before) ^ set(after))}"]
    return [name for name in before if any(a is not b for a, b in zip(before[name], after[name]))]


def copy_adapter(source: Attachment, target: Attachment) -> None:
    values = dict(source.named_parameters())
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            parameter.copy_(values[name])


@pytest.fixture(params=["cpu_offload", "disk"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("method", list(ATTACH))
def test_dispatched_model_matches_the_plain_model(kind: str, method: str, tmp_path: Path) -> None:
    batch = random_batch(2, 6, seed=3)
    model = dispatched(kind, tmp_path)
    with torch.no_grad():
        base = model(**batch).logits
    hooks = hook_state(model)
    assert any(hook is not None for _, hook, _, _ in hooks.values())
    reference = build_model("llama")
    handle, reference_handle = ATTACH[method](model), ATTACH[method](reference)
    copy_adapter(handle, reference_handle)
    for name, parameter in handle.named_parameters():
        assert parameter.device.type == "cpu", f"{method}: {name} is on {parameter.device}, not the execution device"

    with handle, reference_handle:
        if method == "lora":  # the swapped modules keep their accelerate hooks inside the LoRA layers
            layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
            assert layers
            for layer in layers:
                assert layer.base_layer.__dict__.get("_hf_hook") is not None
        logits = model(**batch).logits
        expected = reference(**batch).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=TOL)
        assert (logits - base).abs().max() > 1e-3, "the adapter changed nothing; the comparison is void"
        logits.float().logsumexp(-1).mean().backward()
        expected.float().logsumexp(-1).mean().backward()
        gradients = {name: p.grad for name, p in reference_handle.named_parameters()}
        for name, parameter in handle.named_parameters():
            assert parameter.grad is not None, f"{method}: no gradient reached {name} through the offload hooks"
            torch.testing.assert_close(parameter.grad, gradients[name], rtol=0, atol=TOL)
        with torch.no_grad(), warnings.catch_warnings():
            # transformers <= 5.18 warns when every weight is offloaded (its device reads as meta)
            warnings.filterwarnings("ignore", message=".*whereas the model is on meta", category=UserWarning)
            generated = cast(Any, model).generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            expected_ids = cast(Any, reference).generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(generated, expected_ids)

    assert same_objects(hooks, hook_state(model)) == [], "detach moved accelerate's hooks or modules"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", list(ATTACH))
def test_cpu_offload_to_cuda_puts_the_adapter_on_the_execution_device(method: str) -> None:
    """Every weight on meta, computed on CUDA: the adapter must live on CUDA (on CPU the fallback hides this)."""
    batch = random_batch(2, 6, seed=3)
    model = cpu_offload(build_model("llama"), execution_device=torch.device("cuda", 0))
    reference = build_model("llama")
    cast(nn.Module, reference).to("cuda")  # transformers types PreTrainedModel.to oddly
    handle, reference_handle = ATTACH[method](model), ATTACH[method](reference)
    copy_adapter(reference_handle, handle)  # the meta-free side is the source
    for name, parameter in handle.named_parameters():
        assert parameter.device.type == "cuda", f"{method}: {name} is on {parameter.device}"
    with handle, reference_handle, torch.no_grad():
        logits = model(**batch).logits  # accelerate moves the CPU inputs to CUDA
        expected = reference(**{key: value.cuda() for key, value in batch.items()}).logits
    torch.testing.assert_close(logits.cuda(), expected, rtol=0, atol=1e-4)  # TF32-free float32; kernels may differ
