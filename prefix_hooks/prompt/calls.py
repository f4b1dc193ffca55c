"""What a prompt changes in one call of a token module's ``forward``, and in what it returns.

A call starting a sequence (no cache, or an empty one) gets the prompt in front of its input
embeddings, with room made in every per-token input (:func:`prepend_to_call`); a call continuing
a cache that holds the prompt only gets its mask and positions extended (:func:`continue_call`).
Afterwards the output loses the virtual positions again (:func:`finish_output`). The tensor
arithmetic, and the conventions (``B``, ``P``, ``L``, offsets, ``1 = attend``), are
:mod:`prefix_hooks.prompt.inputs`'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.prompt.inputs import (
    IGNORE_INDEX,
    prepend_filler,
    prepend_mask,
    prepend_positions,
    prepend_prompt,
    question_answering_loss,
    trim_virtual_outputs,
    virtual_offsets,
)


@dataclass(frozen=True)
class Prepended:
    """What a token module's shadowed forward did to its call: ``length`` real tokens got the
    prompt at ``offsets`` (``None``: in front; see ``prompt.inputs``), or continued a cache
    holding it; ``to_tuple``: the caller asked for a tuple (``return_dict=False``); ``answer``:
    the start/end positions whose loss is computed on the real positions' logits."""

    length: int
    to_tuple: bool
    offsets: torch.Tensor | None = None
    answer: tuple[torch.Tensor, torch.Tensor] | None = None


def refuse_unsupported(
    call: ForwardCall, keyword: str | None, cache: object, num_virtual: int, pools_last_position: bool
) -> None:
    """Raise for a call the prompt cannot serve: a static cache (sized for the real tokens), a mask
    that is not 2-D, or right-padded rows when the model pools its last position (``pools_last_position``).

    Raises:
        ValueError: naming the cache type, the mask's shape or the right-padded rows.
    """
    if getattr(cache, "is_compileable", False):
        raise ValueError(
            f"{keyword} of type {type(cache).__name__} is not supported with prompt tuning: a static "
            f"cache is sized for the real tokens, with no room for the {num_virtual} virtual tokens "
            "(and generate() gives it a 4-D mask without them); use the default DynamicCache"
        )
    mask = call.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        prepend_mask(mask, num_virtual)  # raises the error naming the shape
    if pools_last_position and mask is not None and not bool(mask[:, -1].all()):
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} of the batch are right-padded: {type(call.module).__name__} classifies the last non-pad "
            "token, which it finds from input_ids, and prompt tuning replaces input_ids by inputs_embeds, so "
            "these rows would be classified at a pad position (PEFT does so silently). Pad on the left "
            "(tokenizer.padding_side = 'left') or classify one text per call"
        )


def prepend_to_call(
    call: ForwardCall,
    module: nn.Module,
    prompt: Callable[[], torch.Tensor],
    num_virtual: int,
    placement: str,
    per_token_labels: bool,
) -> tuple[int, torch.Tensor | None]:
    """Put the ``(1, P, D)`` ``prompt()`` in front of the call's input embeddings (``module`` embeds
    ``input_ids``) and make room for it in every per-token input; ``per_token_labels``: ``labels``
    too (``-100`` at the virtual tokens).

    Returns:
        ``(L, offsets)``: the real tokens' count, and where each row's virtual tokens went.

    Raises:
        ValueError: ``labels`` (with ``per_token_labels``) that are not one per token.
    """
    input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    length = (embeds if embeds is not None else input_ids).shape[1]
    mask, positions = call.get("attention_mask"), call.get("position_ids")
    offsets = virtual_offsets(mask, placement)  # (B,) or None: all in front
    if embeds is None:
        embeds = module.get_input_embeddings()(input_ids)  # type: ignore[operator]  # (B, L, D), a swapped one too
        call.set("input_ids", None)
    call.set("inputs_embeds", prepend_prompt(prompt(), embeds, offsets))  # (B, P + L, D)
    if mask is not None:
        call.set("attention_mask", prepend_mask(mask, num_virtual, offsets))  # (B, P + L), 1 = attend
    if positions is not None:
        call.set("position_ids", prepend_positions(positions, num_virtual, offsets))  # (B, P + L)
    token_types = call.get("token_type_ids")
    if token_types is not None:
        call.set("token_type_ids", prepend_filler(token_types, num_virtual, 0, offsets))  # (B, P + L)
    labels = call.get("labels")
    if labels is not None and per_token_labels:
        if labels.dim() != 2 or labels.shape[1] != length:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} are not accepted; expected one label per token, "
                f"(batch, {length})"
            )
        call.set("labels", prepend_filler(labels, num_virtual, IGNORE_INDEX, offsets))  # (B, P + L)
    return length, offsets


def continue_call(call: ForwardCall, cached: int, keyword: str | None, num_virtual: int, placement: str) -> int:
    """Extend the mask and shift the positions of a call continuing a cache that holds the ``P``
    virtual tokens and ``cached`` real ones; returns the call's count of new tokens.

    Raises:
        ValueError: the call's ``attention_mask`` / ``position_ids`` do not continue after the cached
            real tokens (a cache length counted with the virtual tokens).
    """
    mask, positions = call.get("attention_mask"), call.get("position_ids")
    tokens = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else call.get("input_ids")
    # generate() slices its inputs by the cache's length: a cache counting the virtual tokens makes it
    # feed cached tokens again (the mask then is too short; without padding it drops the mask, and the
    # first new position falls inside the cache)
    too_short = mask is not None and tokens is not None and mask.shape[1] != cached + tokens.shape[1]
    if too_short or (mask is None and positions is not None and int(positions[..., 0].max()) < cached):
        raise ValueError(
            f"{keyword} holds {cached} real tokens (plus {num_virtual} virtual ones) but the call's "
            "attention_mask / position_ids do not continue after them; continue from the cache the model "
            "returned (out.cache, which counts real tokens only), with a mask over the cached and the new tokens"
        )
    if mask is not None:
        offsets = virtual_offsets(mask, placement)  # a row's leading pads stay
        call.set("attention_mask", prepend_mask(mask, num_virtual, offsets))  # (B, P + past + q)
    if positions is not None:
        call.set("position_ids", positions + num_virtual)  # (B, q)
    return tokens.shape[1] if tokens is not None else 0


def ask_for_model_output(call: ForwardCall) -> bool:
    """Make the call return a ``ModelOutput``; whether the caller asked for a tuple."""
    to_tuple = call.get("return_dict") is False
    if to_tuple:
        call.set("return_dict", True)
    return to_tuple


def take_answer_positions(call: ForwardCall) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A question-answering head's ``start_positions`` / ``end_positions``, taken out of the call:
    they index the real tokens, so their loss is computed on the real positions' logits."""
    if "start_positions" not in call.params:
        return None
    start, end = call.get("start_positions"), call.get("end_positions")
    if start is None or end is None:
        return None
    call.set("start_positions", None)
    call.set("end_positions", None)
    return start, end


def finish_output(output: Any, prepended: Prepended, keep_virtual_outputs: bool) -> Any:
    """``output`` as the caller expects it: the answer loss on the real positions, the virtual
    positions removed (unless ``keep_virtual_outputs``), a tuple if the caller asked for one."""
    if prepended.answer is not None:
        output = question_answering_loss(output, *prepended.answer, prepended.length, prepended.offsets)
    if not keep_virtual_outputs:
        output = trim_virtual_outputs(output, prepended.length, prepended.offsets)
    return output.to_tuple() if prepended.to_tuple else output


def extend_cross_attention_mask(call: ForwardCall, num_virtual: int, placement: str) -> bool:
    """In a decoder stack's call, extend the 2-D ``encoder_attention_mask`` over the ``P`` virtual
    positions the encoder output carries; ``False`` (the call unchanged) when there are none."""
    states, mask = call.get("encoder_hidden_states"), call.get("encoder_attention_mask")
    if states is None or mask is None or mask.dim() != 2 or states.shape[1] != mask.shape[1] + num_virtual:
        return False
    offsets = virtual_offsets(mask, placement)  # as the encoder placed them
    call.set("encoder_attention_mask", prepend_mask(mask, num_virtual, offsets))  # (B, P + L)
    return True
