"""One cell of ``python -m prefix_hooks.check``: a method's adapter on one family's tiny model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prefix_hooks.check import tiny_models
from prefix_hooks.check.adapters import ADAPTERS, REFUSED
from prefix_hooks.check.invariants import (
    bit_difference,
    generate_error,
    incremental_error,
    judge,
    max_difference,
    output_values,
    snapshot,
    state_difference,
)
from prefix_hooks.check.report import CellResult, first_line

ADAPTER_SEED = 7
"""Seeds the adapters' weights (and P-tuning's default init) in every cell."""


def check_cell(family: str, variant: str, method: str, tolerance: float) -> CellResult:
    """Build the tiny model of ``family`` (``variant``), attach ``method``'s adapter and measure every
    invariant that applies; any exception becomes an ``error`` cell naming the phase it came from."""
    result = CellResult(family, method, variant)
    phase = "build"  # what the cell is doing, so an unexpected exception says where it came from
    refused_by_design = family in REFUSED.get(method, frozenset())
    try:
        model = tiny_models.build(family, variant=variant)
        inputs = tiny_models.example_inputs(family)
        phase = "base forward"
        base = output_values(model, inputs)
        state = snapshot(model)
        torch.manual_seed(ADAPTER_SEED)  # P-tuning's default init
        generator = torch.Generator().manual_seed(ADAPTER_SEED)
        phase = "attach"
        if refused_by_design:
            return _check_refusal(result, model, inputs, base, state, generator)
        handle = ADAPTERS[method](model, generator)
        with handle:
            phase = "adapted forward"
            adapted = output_values(model, inputs)
            if adapted.shape != base.shape:
                raise ValueError(f"the adapted output has {adapted.numel()} values, the base output {base.numel()}")
            result.errors["changes"] = max_difference(adapted, base)
            if family in tiny_models.GENERATING:
                phase = "cache"
                result.errors["cache"] = incremental_error(model, family, inputs)
                phase = "generate"
                result.errors["generate"], same_tokens = generate_error(model, inputs)
                if not same_tokens:
                    result.failed.append("generate")
                    result.message = "cached and uncached generate() chose different tokens"
            phase = "detach"
        phase = "restored forward"
        after = output_values(model, inputs)
        result.errors["detach"] = max(bit_difference(after, base), state_difference(state, snapshot(model)))
    except Exception as error:  # noqa: BLE001 - every exception is reported in the table
        result.status = "error"
        result.message = f"{type(error).__name__} ({phase}): {first_line(error)}"
        return result
    judge(result, tolerance)
    return result


def _check_refusal(
    result: CellResult,
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    base: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> CellResult:
    """A cell refused by design: attaching must raise ``ValueError`` and leave the model untouched."""
    try:
        handle = ADAPTERS[result.method](model, generator)
        handle.attach()
    except ValueError as error:
        result.message = first_line(error)
        touched = max(bit_difference(output_values(model, inputs), base), state_difference(state, snapshot(model)))
        if touched:
            result.status, result.errors["refusal"], result.failed = "fail", touched, ["refusal"]
            result.message = f"the refusal changed the model: {result.message}"
        else:
            result.status = "refused"
        return result
    handle.detach()
    result.status, result.failed = "fail", ["refusal"]
    result.message = f"{result.method} attached to {result.family}, which it refuses by design"
    return result
