"""Clear errors, raised before anything is mutated, for what the inline families cannot do."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from test_lifecycle import assert_untouched, snapshot, warm_up
from tiny_inline import build_variant
from torch import nn

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.families import adapter_for


@pytest.mark.parametrize("variant", ["bloom", "mpt"])
def test_position_offset_on_an_alibi_family_raises_before_attaching(variant: str) -> None:
    model = build_variant(variant, "eager")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"position_offset=2 does not apply to (bloom|mpt).*None or 0"):
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, position_offset=2))
    assert_untouched(model, before)


@pytest.mark.parametrize("variant", ["falcon", "gptj", "codegen", "gpt_neo", "bloom", "mpt"])
def test_flash_attention_is_refused_by_name(variant: str) -> None:
    """The flash modules of these families compute attention in a kernel no view reaches."""
    adapter = adapter_for(build_variant(variant, "eager"))
    flash_model = cast(nn.Module, SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    reason: Any = adapter.unsupported_reason(flash_model)
    assert reason is not None and "'flash_attention_2'" in reason and "attn_implementation='eager'" in reason
