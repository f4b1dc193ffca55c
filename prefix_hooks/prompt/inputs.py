"""Tensor arithmetic of prompt learning: make room for ``P`` virtual tokens in a call's inputs,
and take them out of its outputs again.

Conventions: ``B`` is the batch, ``P`` the number of virtual tokens, ``L`` the number of real
tokens the caller passed. The virtual tokens come first, at positions ``0..P-1``; the real
tokens follow at their own positions plus ``P``. Masks use ``1 = attend``.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
"""The label of a virtual position: cross-entropy ignores it."""


def prepend_mask(mask: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """``(B, L)`` 2-D mask -> ``(B, P + L)`` with the virtual tokens attended (``1``).

    Raises:
        ValueError: ``mask`` is not 2-D (a 4-D mask already fixes the key length; pass the 2-D one).
    """
    if mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} is not accepted with prompt tuning; expected a 2-D "
            "(batch, length) mask, which gets one column of ones per virtual token"
        )
    ones = mask.new_ones(mask.shape[0], num_virtual)  # (B, P), 1 = attend
    return torch.cat((ones, mask), dim=1)  # (B, P + L)


def prepend_filler(values: torch.Tensor, num_virtual: int, fill: int) -> torch.Tensor:
    """``(B, L)`` per-token values (labels, token types) -> ``(B, P + L)`` with ``fill`` in front."""
    filler = values.new_full((values.shape[0], num_virtual), fill)  # (B, P)
    return torch.cat((filler, values), dim=1)  # (B, P + L)


def prepend_positions(position_ids: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """``(B, L)`` or ``(L,)`` positions -> ``(B, P + L)``: ``0..P-1`` for the virtual tokens, then
    the given positions plus ``P``."""
    positions = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)  # (B, L)
    virtual = torch.arange(num_virtual, dtype=positions.dtype, device=positions.device)  # (P,)
    virtual = virtual.unsqueeze(0).expand(positions.shape[0], num_virtual)  # (B, P)
    return torch.cat((virtual, positions + num_virtual), dim=1)  # (B, P + L)


def prepend_prompt(prompt: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """``(1, P, D)`` prompt and ``(B, L, D)`` input embeddings -> ``(B, P + L, D)`` in ``embeds``' dtype."""
    batch = embeds.shape[0]
    prompt = prompt.to(dtype=embeds.dtype, device=embeds.device).expand(batch, -1, -1)  # (B, P, D)
    return torch.cat((prompt, embeds), dim=1)  # (B, P + L, D)


def _keep_last(tensor: Any, dim: int, length: int) -> Any:
    """The last ``length`` entries along ``dim`` (all of them when there are fewer)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
        return tensor
    size = tensor.shape[dim]
    return tensor.narrow(dim, size - length, length) if size > length else tensor  # a view


_PER_TOKEN_KEYS = ("last_hidden_state", "start_logits", "end_logits")


def trim_virtual_outputs(output: Any, length: int) -> Any:
    """Remove the virtual positions from a model output, keeping the last ``length`` (``L``) of each
    per-token axis, in place on a transformers ``ModelOutput`` (slices are views).

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
            output[key] = _keep_last(value, 1, length)
        elif key == "hidden_states" and isinstance(value, tuple):
            output[key] = tuple(_keep_last(state, 1, length) for state in value)
        elif key == "attentions" and isinstance(value, tuple):
            output[key] = tuple(_keep_last(weights, -2, length) for weights in value)
    return output
