"""Coverage matrix: every supported family x attention backend x {no cache, cache}.

Each family in :func:`prefix_hooks.families.supported` must have a tiny test model in one
of the test-model modules; each cell checks what holds for every architecture:

- no cache: the prefix changes the output, and detaching gives the base output back bit-exactly;
- cache (families that generate): greedy ``generate()`` with the cache equals ``generate()``
  without it (the prefix never enters the cache, so both see the same keys).

The per-family files hold the stronger oracles (hand-written attention, PEFT, padded rows).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import tiny_encoders
import tiny_inline
import tiny_models
import tiny_seq2seq
import torch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import PrefixTuningConfig, attach_prefix, supported

NUM_VIRTUAL_TOKENS = 3
NEW_TOKENS = 3


@dataclass(frozen=True)
class Cell:
    """One family x backend: how to build its tiny model and its inputs."""

    family: str
    backend: str
    build: Callable[[str, str, int], PreTrainedModel]
    inputs: Callable[[str], dict[str, torch.Tensor]]

    def __str__(self) -> str:
        return f"{self.family}-{self.backend}"


def _decoder_build(family: str, backend: str, seed: int) -> PreTrainedModel:
    return tiny_models.build_model(family, backend, seed)


def _decoder_inputs(family: str) -> dict[str, torch.Tensor]:
    return tiny_models.random_batch(2, 6, seed=1, left_pad=[0, 2])


def _module_build(module: Any) -> Callable[[str, str, int], PreTrainedModel]:
    def build(family: str, backend: str, seed: int) -> PreTrainedModel:
        return module.build(family, backend, seed)

    return build


def _module_inputs(module: Any) -> Callable[[str], dict[str, torch.Tensor]]:
    def inputs(family: str) -> dict[str, torch.Tensor]:
        return module.example_inputs(family, batch=2, seed=1)

    return inputs


def _cells() -> list[Cell]:
    cells = [Cell(family, backend, _decoder_build, _decoder_inputs) for family, backend in tiny_models.family_backend_pairs()]
    for module in (tiny_encoders, tiny_inline, tiny_seq2seq):
        for family, backends in module.FAMILIES.items():
            cells += [Cell(family, backend, _module_build(module), _module_inputs(module)) for backend in backends]
    return cells


CELLS = _cells()


def test_every_supported_family_has_a_test_model() -> None:
    tested = {cell.family for cell in CELLS}
    missing = sorted(set(supported()) - tested)
    assert not missing, f"supported families without a tiny test model: {missing}"


def test_every_test_model_is_a_supported_family() -> None:
    assert {cell.family for cell in CELLS} <= set(supported())


def _output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise AssertionError(f"{type(output).__name__} has neither logits nor last_hidden_state")


def _randomised_prefix(model: PreTrainedModel) -> Any:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in handle.encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return handle


@pytest.mark.parametrize("cell", CELLS, ids=str)
def test_no_cache_prefix_changes_output_and_detach_restores(cell: Cell) -> None:
    model = cell.build(cell.family, cell.backend, 0)
    inputs: dict[str, Any] = dict(cell.inputs(cell.family))
    if "use_cache" in _forward_params(model):
        inputs["use_cache"] = False
    base = _output(model, inputs)
    handle = _randomised_prefix(model)
    with handle:
        prefixed = _output(model, inputs)
    after = _output(model, inputs)
    assert prefixed.shape == base.shape
    assert (prefixed - base).abs().max() > 1e-3, "the prefix did not change the output"
    assert torch.equal(after, base)


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


GENERATING = [cell for cell in CELLS if cell.family not in tiny_encoders.FAMILIES or cell.family == tiny_encoders.LLAVA]


@pytest.mark.parametrize("cell", GENERATING, ids=str)
def test_cache_generate_equals_generate_without_cache(cell: Cell) -> None:
    model = cell.build(cell.family, cell.backend, 0)
    inputs = cell.inputs(cell.family)
    handle = _randomised_prefix(model)
    settings: dict[str, Any] = {
        "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0,
        "return_dict_in_generate": True, "output_logits": True,
    }
    with handle, torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **settings)  # type: ignore[operator]
        uncached = model.generate(**inputs, use_cache=False, **settings)  # type: ignore[operator]
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, atol=1e-4, rtol=1e-4)
