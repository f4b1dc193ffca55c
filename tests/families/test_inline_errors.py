"""Clear errors for what the inline families cannot do: raised before anything is mutated where the
model tells at attach time, else at the call."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from restoration import assert_untouched, snapshot, warm_up
from tiny_inline import build_variant
from torch import nn

from prefix_hooks import PrefixTuningConfig, attach_prefix
from prefix_hooks.families import adapter_for
from prefix_hooks.families._inline import InlineAttentionAdapter


@pytest.mark.parametrize("variant", ["bloom", "mpt"])
def test_position_offset_on_an_alibi_family_raises_before_attaching(variant: str) -> None:
    model = build_variant(variant, "eager")
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"position_offset=2 does not apply to (bloom|mpt).*None or 0"):
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, position_offset=2))
    assert_untouched(model, before)


class _AskingForFlash(nn.Module):
    """``model``'s modules under a config that asks for flash attention (no flash kernel needed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = SimpleNamespace(_attn_implementation="flash_attention_2")


@pytest.mark.parametrize("variant", ["falcon", "gptj", "codegen", "gpt_neo", "bloom", "mpt"])
def test_flash_attention_is_refused_by_name_where_a_cache_view_serves(variant: str) -> None:
    """A cache view widens eager/sdpa masks only, so a family whose attention modules get one refuses
    flash attention by name; where the interposer serves every module (GPT-J and CodeGen since 5.24)
    the interposer's own backend support applies."""
    model = build_variant(variant, "eager")
    adapter = cast(InlineAttentionAdapter, adapter_for(model))
    viewed = [site for site in adapter.attention_sites(model) if not adapter.serves_through_registry(site.module)]
    reason: Any = adapter.unsupported_reason(_AskingForFlash(model))
    if viewed:
        assert reason is not None and "'flash_attention_2'" in reason and "attn_implementation='eager'" in reason
    else:
        assert reason is None


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_falcon_without_a_mask_for_several_queries_raises(impl: str) -> None:
    """FalconModel always materialises its mask; were it to pass none, sdpa would read ``None`` as causal
    over the prefix columns (and slice keys), so the cache view refuses instead of attending wrongly."""
    model = build_variant("falcon", impl)
    attention = model.get_submodule("transformer.h.0.self_attention")

    def drop_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args, {**kwargs, "attention_mask": None}

    hook = attention.register_forward_pre_hook(drop_mask, with_kwargs=True)  # runs before the view's hook
    try:
        with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2)), pytest.raises(
            ValueError, match="falcon: the attention module got no mask for several queries"
        ):
            model(input_ids=torch.ones(1, 3, dtype=torch.long))
    finally:
        hook.remove()
