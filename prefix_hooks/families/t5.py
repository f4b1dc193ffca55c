"""T5: relative position bias instead of positions, shared by the layers of a stack.

The first layer of each stack computes ``position_bias`` ``(1, H, T, S)`` (a learned relative
bias for self-attention, zeros for cross-attention) and passes it to the attention function
next to the mask; the stack hands the same tensor to every later layer. With ``P`` prefix keys
the bias needs ``P`` more columns, so a pre-hook on each site gives the first layer a bias of
``P + S`` columns, which the stack then passes on:

* ``full`` layout: the prefix columns are 0 (prefix keys have no relative position);
* ``peft`` layout, decoder self-attention: PEFT's cached prefix sits at positions ``0..P-1``
  right before the real tokens, so its columns carry the relative bias of those positions
  (queries at ``P + past + t``), exactly as T5 computes it over PEFT's cache.

Positions are relative, so ``position_offset`` changes nothing on T5.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import find_cache, forward_parameters
from prefix_hooks.families._seq2seq import CROSS, DECODER, ENCODER, EncoderDecoderAdapter, Seq2SeqSite
from prefix_hooks.prefix.architecture import CurrentState
from prefix_hooks.prefix.config import EncoderDecoderLayout

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack


@dataclass(frozen=True)
class T5Adapter(EncoderDecoderAdapter):
    """Both stacks are ``T5Stack``; ``is_decoder`` tells them apart."""

    def stack_role(self, module: nn.Module) -> str | None:
        if type(module).__name__ != "T5Stack":
            return None
        return DECODER if module.is_decoder else ENCODER

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        return None  # relative positions: an offset changes nothing

    def install_stack_hooks(
        self, stack: nn.Module, sites: list[Seq2SeqSite], current_state: CurrentState, undo: UndoStack
    ) -> None:
        """A pre-hook per site that gives the stack's first layer a bias with prefix columns."""
        for site in sites:
            handle = site.module.register_forward_pre_hook(_bias_with_prefix(site, current_state), with_kwargs=True)
            undo.push(handle.remove)


def _bias_with_prefix(site: Seq2SeqSite, current_state: CurrentState) -> Any:
    """A T5Attention pre-hook passing ``position_bias`` ``(1, H, T, P + S)`` where the model passes None.
    A partial, not a closure: a copy of the attached model rebinds it."""
    return functools.partial(_fill_bias, site, current_state)


def _fill_bias(
    site: Seq2SeqSite, current_state: CurrentState, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:  # module: a T5Attention
    if kwargs.get("position_bias") is not None or current_state() is None:
        return None  # a later layer (the bias already has the prefix columns) or no prefix now
    peft_positions = site.layout is EncoderDecoderLayout.PEFT and site.role == DECODER
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d_model)
    q_len = hidden.shape[1]
    past, kv_len = _past_and_key_length(module, site.role, q_len, kwargs)
    num_prefix = site.num_virtual_tokens
    if not module.has_relative_attention_bias:
        bias = torch.zeros(1, module.n_heads, q_len, num_prefix + kv_len, device=hidden.device, dtype=hidden.dtype)
    elif peft_positions:  # prefix at positions 0..P-1, real tokens from P on
        bias = module.compute_bias(q_len, num_prefix + kv_len, hidden.device, past_seen_tokens=past + num_prefix)
    else:
        real = module.compute_bias(q_len, kv_len, hidden.device, past_seen_tokens=past)  # (1, H, T, S)
        bias = torch.cat([real.new_zeros(1, real.shape[1], q_len, num_prefix), real], dim=-1)  # (1, H, T, P + S)
    kwargs["position_bias"] = bias  # (1, H, T, P + S)
    return args, kwargs


def _past_and_key_length(module: Any, role: str, q_len: int, kwargs: dict[str, Any]) -> tuple[int, int]:
    """``(tokens already cached, keys the attention will see)`` for this call, as T5Attention counts them."""
    if role == CROSS:
        return 0, kwargs["key_value_states"].shape[1]  # the encoder length, cached or not
    _, cache = find_cache(ForwardCall(forward_parameters(module), (), kwargs))
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if cache is None:
        return 0, q_len
    past = int(cache.get_seq_length(module.layer_idx))
    kv_len, _ = cache.get_mask_sizes(q_len, module.layer_idx)
    return past, int(kv_len)


ADAPTER = T5Adapter(
    name="t5",
    model_types=("t5",),
    attention_classes=("T5Attention",),
    head_dim_attr="key_value_proj_dim",
    heads_attr="n_heads",
    cross_attention_name="EncDecAttention",
)
