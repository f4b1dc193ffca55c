"""What the families with attention of their own (falcon, gptj, codegen, gpt_neo, bloom, mpt) share.

Up to transformers 5.23 these modules compute attention themselves instead of calling the
attention-function registry. Each such module gets a forward pre-hook
(:func:`prefix_hooks.prefix.cache_view.install_cache_view_hooks`) that swaps its cache argument
for a view prepending the prefix, and widens its mask by ``P`` columns that every query may
attend. A family says which attribute holds the layer index and, where needed, how its
alibi bias grows; the cache argument's name comes from each module's signature.

Since 5.24 GPT-J and CodeGen attend through the registry and pass ``**kwargs`` down to it:
a module found to call the registry (:func:`prefix_hooks.core.transformers_compat.attends_through_registry`)
is served by the interposer like any llama-style family, which handles every backend's
mask (sdpa's implicit causal ``mask=None`` included), and gets no hook. A family whose
registry calls still need a cache view (Falcon: its layers drop ``**kwargs``, its alibi
lives in the mask) says so in :meth:`InlineAttentionAdapter.serves_through_registry`.

Alibi (bloom, falcon with ``alibi=True``): the model biases key ``j`` by ``slope * j``
with ``j`` counted from the row's first real token (softmax ignores the per-query
constant of true ALiBi). The prefix sits right before that token, at ``-P..-1``, as in
PEFT (which puts it in the cache and counts it in the mask): the real tokens keep their
own bias, so no position offset applies to these families.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import MASK_KEYWORD, attends_through_registry
from prefix_hooks.prefix.architecture import ArchitectureAdapter, AttentionSite, CurrentState, SpliceSource
from prefix_hooks.prefix.cache_view import install_cache_view_hooks
from prefix_hooks.prefix.splice import extend_mask

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack

MaskFill = bool | float | None
"""The value of the prefix's mask columns: ``None`` follows the mask's own convention
(``True``/``0.0`` = attend, as in :func:`prefix_hooks.prefix.splice.extend_mask`)."""


def memoized(state: SpliceSource, tag: str, tensor: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()`` once per forward for ``tensor`` (layers share their root's mask and alibi)."""
    key = (tag, id(tensor))
    cached = state.mask_cache.get(key)
    if cached is not None and cached[0] is tensor:
        return cached[1]
    extended = build()
    state.mask_cache[key] = (tensor, extended)
    return extended


def widen_mask(mask: torch.Tensor, num_prefix: int, fill: MaskFill = None) -> torch.Tensor:
    """``(..., S)`` -> ``(..., P + S)`` with ``fill`` (default: "attend" in the mask's convention) in front."""
    if fill is None:
        return extend_mask(mask, num_prefix)
    visible = mask.new_full((*mask.shape[:-1], num_prefix), fill)  # (..., P)
    return torch.cat([visible, mask], dim=-1)  # (..., P + S)


def prefix_alibi(build_alibi: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor], num_heads: int,
                 num_prefix: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The alibi bias of the prefix keys, at positions ``-P..-1`` before the first real token.

    ``build_alibi(mask, heads, dtype)`` is the model's own builder (``slope * position``,
    rounded as the model rounds it); slopes are odd in the position, so ``-bias(k)`` is the
    bias of position ``-k``.

    Returns:
        ``(heads, 1, P)``.
    """
    ones = torch.ones(1, num_prefix + 1, dtype=torch.long, device=device)  # positions 0..P
    forward = build_alibi(ones, num_heads, dtype).reshape(num_heads, 1, num_prefix + 1)  # (H, 1, P + 1)
    return -forward[..., 1:].flip(-1)  # (H, 1, P): positions -P..-1


def widen_alibi(alibi: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Prepend per-head ``columns`` ``(H, 1, P)`` to an alibi laid out batch-major then head.

    Args:
        alibi: ``(B * H, 1, S)`` (bloom) or ``(B, H, 1, S)`` (falcon).

    Returns:
        the same layout with ``P + S`` columns.
    """
    heads, _, num_prefix = columns.shape
    batch = alibi.numel() // (heads * alibi.shape[-1])
    front = columns.to(alibi.dtype)[None].expand(batch, heads, 1, num_prefix)  # (B, H, 1, P)
    return torch.cat([front.reshape(*alibi.shape[:-1], num_prefix), alibi], dim=-1)  # (..., P + S)


@dataclass(frozen=True)
class InlineAttentionAdapter(ArchitectureAdapter):
    """An adapter for attention modules that call ``cache.update`` and then attend inline, or
    (on newer releases) through the attention-function registry.

    Attributes:
        mask_fill: value of the prefix's mask columns (``None``: the mask's "attend" value).
    """

    mask_fill: MaskFill = None

    def serves_through_registry(self, module: nn.Module) -> bool:
        """Whether the interposer delivers ``module``'s prefix (no cache view): it calls the
        attention-function registry, which receives the per-forward state through ``**kwargs``."""
        return attends_through_registry(module)

    def unsupported_reason(self, model: nn.Module) -> str | None:
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation in (None, "eager", "sdpa"):
            return None
        sites = [module for module in model.modules() if type(module).__name__ in self.attention_classes]
        if sites and all(self.serves_through_registry(module) for module in sites):
            return None  # the interposer serves every site: its own backend check applies
        return (
            f"{self.name} with attn_implementation={implementation!r} is not supported with a prefix "
            "(its attention modules take the prefix through a cache view, whose masks only eager and sdpa read); "
            "load the model with attn_implementation='eager'" + (" or 'sdpa'" if self.name == "falcon" else "")
        )

    def interposer_serves(self, site: AttentionSite) -> bool:
        return self.serves_through_registry(site.module)

    def install_site_hooks(self, sites: list[AttentionSite], current_state: CurrentState, undo: UndoStack) -> None:
        viewed = [site for site in sites if not self.interposer_serves(site)]
        install_cache_view_hooks(viewed, current_state, undo, self.extend_arguments)

    def extend_arguments(self, module: nn.Module, call: ForwardCall, num_prefix: int, state: SpliceSource) -> None:
        """Widen the call's mask by ``P`` visible columns (``None`` stays ``None``).

        Families with more position-dependent arguments (alibi) extend this.
        """
        mask = call.get(MASK_KEYWORD)
        if isinstance(mask, torch.Tensor):
            call.set(MASK_KEYWORD, memoized(state, "mask", mask, lambda: widen_mask(mask, num_prefix, self.mask_fill)))


@dataclass(frozen=True)
class PositionFreeAdapter(InlineAttentionAdapter):
    """A family whose root takes no ``position_ids`` (positions live in its alibi bias)."""

    def default_position_offset(self, root: nn.Module, num_virtual_tokens: int) -> int:
        return 0

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        if offset:
            return (
                f"position_offset={offset} does not apply to {self.name}: it has no position_ids, and its alibi "
                "bias already places the prefix right before the first token (as PEFT does); use "
                "position_offset=None or 0"
            )
        return None

