"""Tensor arithmetic of prompt learning: make room for ``P`` virtual tokens in a call's inputs,
and take them out of its outputs again.

Conventions: ``B`` is the batch, ``P`` the number of virtual tokens, ``L`` the number of real
tokens the caller passed. The virtual tokens sit at positions ``0..P-1``; the real tokens follow
at their own positions plus ``P``. Masks use ``1 = attend``.

Where the virtual tokens go in each row is its *offset* (``offsets``, ``(B,)``): ``0`` puts them
in front of everything (PEFT's layout, ``[virtual][pads][tokens]``); with
``virtual_token_placement="after_padding"`` a left-padded row gets them right before its first
real token (``[pads][virtual][tokens]``), so the row computes what it computes alone. Every
function takes ``offsets=None`` for "all rows at 0", the plain ``cat`` / slice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.loss.loss_utils import ForQuestionAnsweringLoss

from prefix_hooks.prompt.config import AFTER_PADDING

IGNORE_INDEX = -100
"""The label of a virtual position: cross-entropy ignores it."""

def virtual_offsets(mask: torch.Tensor | None, placement: str) -> torch.Tensor | None:
    """Per row, the column the virtual tokens start at: its number of leading pads (``mask == 0``)
    for ``"after_padding"``; ``None`` (every row at 0) for ``"peft"``, without a 2-D mask, or when
    no row starts with padding.

    Continuing a cache gives the same offsets: the leading pads of a row never change.
    """
    if placement != AFTER_PADDING or mask is None or mask.dim() != 2:
        return None
    leading_pads = ((mask != 0).long().cumsum(dim=1) == 0).sum(dim=1)  # (B,)
    return leading_pads if bool(leading_pads.any()) else None


def _insert_index(offsets: torch.Tensor, num_virtual: int, length: int) -> torch.Tensor:
    """``(B, P + L)``: for each column of the placed row, its column in ``cat(virtual, real)``."""
    columns = torch.arange(num_virtual + length, device=offsets.device).unsqueeze(0)  # (1, P + L)
    start = offsets.unsqueeze(1)  # (B, 1)
    before, virtual = columns < start, columns < start + num_virtual  # (B, P + L) each
    return torch.where(before, columns + num_virtual, torch.where(virtual, columns - start, columns))


def real_columns(offsets: torch.Tensor, num_virtual: int, length: int) -> torch.Tensor:
    """``(B, L)``: the columns of the ``L`` real tokens (pads included) in a placed ``(B, P + L)`` row."""
    columns = torch.arange(length, device=offsets.device).unsqueeze(0)  # (1, L)
    return torch.where(columns < offsets.unsqueeze(1), columns, columns + num_virtual)  # (B, L)


def _gather_columns(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` with axis ``dim`` re-indexed per row by ``index`` ``(B, N)`` (axis 0 is the batch)."""
    moved = tensor.movedim(dim, 1)  # (B, T, ...)
    shape = (*index.shape, *moved.shape[2:])
    full_index = index.to(moved.device).reshape(*index.shape, *([1] * (moved.dim() - 2))).expand(shape)
    return moved.gather(1, full_index).movedim(1, dim)


def _place(virtual: torch.Tensor, real: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """``(B, P, ...)`` and ``(B, L, ...)`` -> ``(B, P + L, ...)`` with each row's virtual part at its offset."""
    joined = torch.cat((virtual, real), dim=1)  # (B, P + L, ...): PEFT's layout
    if offsets is None:
        return joined
    return _gather_columns(joined, _insert_index(offsets, virtual.shape[1], real.shape[1]), 1)


def prepend_mask(mask: torch.Tensor, num_virtual: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L)`` 2-D mask -> ``(B, P + L)`` with the virtual tokens attended (``1``) at ``offsets``.

    Raises:
        ValueError: ``mask`` is not 2-D (a 4-D mask already fixes the key length; pass the 2-D one).
    """
    if mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} is not accepted with prompt tuning; expected a 2-D "
            "(batch, length) mask, which gets one column of ones per virtual token"
        )
    ones = mask.new_ones(mask.shape[0], num_virtual)  # (B, P), 1 = attend
    return _place(ones, mask, offsets)  # (B, P + L)


def prepend_filler(
    values: torch.Tensor, num_virtual: int, fill: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, L)`` per-token values (labels, token types) -> ``(B, P + L)`` with ``fill`` at the virtual tokens."""
    filler = values.new_full((values.shape[0], num_virtual), fill)  # (B, P)
    return _place(filler, values, offsets)  # (B, P + L)


def prepend_positions(
    position_ids: torch.Tensor, num_virtual: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, L)`` or ``(L,)`` positions -> ``(B, P + L)``: ``0..P-1`` for the virtual tokens, the
    given positions plus ``P`` for the real ones."""
    positions = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)  # (B, L)
    if offsets is not None:
        positions = positions.expand(offsets.shape[0], -1)  # (B, L)
    virtual = torch.arange(num_virtual, dtype=positions.dtype, device=positions.device)  # (P,)
    virtual = virtual.unsqueeze(0).expand(positions.shape[0], num_virtual)  # (B, P)
    return _place(virtual, positions + num_virtual, offsets)  # (B, P + L)


def prepend_prompt(prompt: torch.Tensor, embeds: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``(1, P, D)`` prompt and ``(B, L, D)`` input embeddings -> ``(B, P + L, D)`` in ``embeds``' dtype."""
    batch = embeds.shape[0]
    prompt = prompt.to(dtype=embeds.dtype, device=embeds.device).expand(batch, -1, -1)  # (B, P, D)
    return _place(prompt, embeds, offsets)  # (B, P + L, D)


def _keep_real(tensor: Any, dim: int, length: int, offsets: torch.Tensor | None) -> Any:
    """The ``length`` real entries along ``dim`` (all of them when there are not more): the last
    ``length`` (a view) when every row's virtual tokens are in front, else gathered per row."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        return tensor
    size = tensor.shape[dim]
    if size <= length:
        return tensor
    if offsets is None:
        return tensor.narrow(dim, size - length, length)  # a view
    return _gather_columns(tensor, real_columns(offsets, size - length, length), dim)


_PER_TOKEN_KEYS = ("last_hidden_state", "start_logits", "end_logits")


def trim_virtual_outputs(output: Any, length: int, offsets: torch.Tensor | None = None) -> Any:
    """Remove the virtual positions from a model output, keeping the ``length`` (``L``) real ones
    of each per-token axis (the last ``L``, as views, when ``offsets`` is ``None``), in place on a
    transformers ``ModelOutput``.

    * ``logits`` ``(B, P + L, V)`` -> ``(B, L, V)``; 2-D logits (sequence classification) are kept;
      logits already shorter than ``L`` (``logits_to_keep``) are kept;
    * ``last_hidden_state``, ``start_logits``, ``end_logits``: axis 1;
    * every ``hidden_states`` entry: axis 1; every ``attentions`` entry: the query axis (``-2``;
      the key axis keeps the virtual tokens the real ones attended to).
    """
    if not hasattr(output, "keys"):
        return output
    for key in list(output.keys()):
        value = output[key]
        per_token_logits = key == "logits" and isinstance(value, torch.Tensor) and value.dim() == 3
        if per_token_logits or key in _PER_TOKEN_KEYS:
            output[key] = _keep_real(value, 1, length, offsets)
        elif key == "hidden_states" and isinstance(value, tuple):
            output[key] = tuple(_keep_real(state, 1, length, offsets) for state in value)
        elif key == "attentions" and isinstance(value, tuple):
            output[key] = tuple(_keep_real(weights, -2, length, offsets) for weights in value)
    return output


def question_answering_loss(
    output: Any, start_positions: torch.Tensor, end_positions: torch.Tensor, length: int,
    offsets: torch.Tensor | None = None,
) -> Any:
    """``output`` (a question-answering ``ModelOutput``) with the loss of the user's start/end
    positions over the ``length`` real positions' logits: what the base model computes on the
    returned logits, with no probability spent on the virtual positions.

    Returns:
        A new output of the same class, ``loss`` first (so ``to_tuple()`` keeps transformers' order).
    """
    start_logits = _keep_real(output["start_logits"], 1, length, offsets)  # (B, L)
    end_logits = _keep_real(output["end_logits"], 1, length, offsets)  # (B, L)
    loss = ForQuestionAnsweringLoss(start_logits, end_logits, start_positions, end_positions)
    fields = {key: value for key, value in output.items() if key != "loss"}
    return type(output)(loss=loss, **fields)
