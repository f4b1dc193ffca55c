"""The invariants ``python -m prefix_hooks.check`` checks in every cell, and how each is measured.

* ``changes``: the adapter changes the output (by more than :data:`MIN_EFFECT`);
* ``cache``: incremental decoding through ``forward`` equals one full forward (families that
  decode with a cache): prefill, then one-token steps passing the returned cache under the
  keyword the installed ``forward`` takes, with no ``position_ids``, so the library has to
  place every step itself;
* ``generate``: greedy ``generate()`` with the cache equals it without (tokens, and the logits
  of every new token);
* ``detach``: after detach the outputs and every ``state_dict`` tensor are bit-exactly what
  they were before attaching;
* ``refusal``: a cell refused by design raises before touching the model.

Errors are absolute, float32, and must stay within the tolerance (``detach`` must be exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prefix_hooks.check.report import CellResult
from prefix_hooks.check.tiny_models import PAD, stream_key
from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters, output_cache

INVARIANTS: tuple[str, ...] = ("changes", "cache", "generate", "detach", "refusal")
TOLERANCE = 1e-4
"""Default absolute tolerance (float32) for ``cache`` and ``generate``."""
MIN_EFFECT = 1e-3
"""The adapter must move some output by more than this, or the other invariants prove nothing."""
DECODE_STEPS = 3
"""One-token steps after the prefill in the ``cache`` invariant."""
NEW_TOKENS = 3
"""Tokens ``generate()`` adds in the ``generate`` invariant."""


def output_values(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits and the last (decoder) hidden state of one forward, flattened: fresh
    classification heads give logits ~1e-2, too small alone to show an adapter's effect."""
    with torch.no_grad():
        output: Any = model(**inputs, output_hidden_states=True)
    parts = [output.logits.flatten()] if isinstance(getattr(output, "logits", None), torch.Tensor) else []
    hidden = getattr(output, "decoder_hidden_states", None) or getattr(output, "hidden_states", None)
    if hidden:
        parts.append(hidden[-1].flatten())
    return torch.cat(parts)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` (``inf`` when the shapes differ, ``nan`` propagates)."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def bit_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """0.0 when ``a`` and ``b`` are bit-identical (same dtype, shape, values), else ``max |a - b|``,
    or ``inf`` where that is not positive (a NaN, a changed dtype or shape)."""
    if a.dtype == b.dtype and torch.equal(a, b):
        return 0.0
    difference = max_difference(a, b) if a.dtype == b.dtype else math.inf
    return difference if difference > 0 else math.inf


def state_difference(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """0.0 when both state dicts hold the same names with bit-identical tensors, else the largest
    difference (``inf`` for a missing or extra name)."""
    if before.keys() != after.keys():
        return math.inf
    return max((bit_difference(tensor, after[name]) for name, tensor in before.items()), default=0.0)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def incremental_error(model: nn.Module, family: str, inputs: Mapping[str, torch.Tensor]) -> float:
    """``max |logits|`` difference between one full forward and prefill + one-token steps.

    The cache goes back in under the keyword the installed ``forward`` takes; no
    ``position_ids`` are passed. Decoders get the attention mask of the tokens so far and
    llava its image with the prefill; encoder-decoders get their encoder inputs at every step.
    Only real (unpadded) positions are compared.
    """
    parameters = forward_parameters(model)
    keyword = cache_keyword(parameters)
    if keyword is None:
        raise TypeError(f"{type(model).__name__}.forward takes no cache argument; its parameters: {parameters}")
    streamed = stream_key(family)
    stream = inputs[streamed]  # (B, T)
    if streamed == "input_ids":  # decoders: the mask grows with the tokens; llava's image goes in the prefill
        mask = inputs.get("attention_mask")  # (B, T), 1 = real token
        prefill_only = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        every_step = {}
    else:  # encoder-decoders: the encoder's inputs with every call
        mask = None
        prefill_only = {}
        every_step = {key: value for key, value in inputs.items() if key != streamed}
    length = stream.shape[1]
    prefill = length - DECODE_STEPS

    def upto(end: int) -> dict[str, torch.Tensor]:
        return {} if mask is None else {"attention_mask": mask[:, :end]}

    with torch.no_grad():
        full = model(**inputs, use_cache=False).logits  # (B, T, V)
        first = {streamed: stream[:, :prefill], **prefill_only, **every_step, **upto(prefill)}
        output = model(**first, use_cache=True)
        steps = [output.logits]
        for t in range(prefill, length):
            cache = {keyword: output_cache(output)}
            output = model(**{streamed: stream[:, t : t + 1]}, **cache, **every_step, **upto(t + 1), use_cache=True)
            steps.append(output.logits)
    incremental = torch.cat(steps, dim=1)  # (B, T, V)
    if incremental.shape != full.shape:
        return math.inf
    real = mask.bool() if mask is not None else torch.ones(stream.shape, dtype=torch.bool)  # (B, T), True = real token
    return max_difference(incremental[real], full[real])


def _greedy(model: nn.Module, prompt: Mapping[str, torch.Tensor], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate()``: ``(sequences (B, S), logits of the new tokens (N, B, V))``."""
    with torch.no_grad():
        result: Any = model.generate(  # type: ignore[operator]
            **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=PAD, use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
        )
    return result.sequences, torch.stack(result.logits)


def generate_error(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[float, bool]:
    """``(max |logits| difference, same tokens)`` between cached and uncached greedy generation."""
    prompt = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    cached, cached_logits = _greedy(model, prompt, use_cache=True)
    uncached, uncached_logits = _greedy(model, prompt, use_cache=False)
    return max_difference(cached_logits, uncached_logits), torch.equal(cached, uncached)


def judge(result: CellResult, tolerance: float) -> None:
    """Mark the invariants ``result.errors`` breaks; ``detach`` must be exact."""
    errors = result.errors
    broken = []
    if not errors.get("changes", 0.0) > MIN_EFFECT:
        change = errors.get("changes", 0.0)
        broken.append(("changes", f"the adapter changed the output by {change:.1e} <= {MIN_EFFECT:.0e}"))
    for name in ("cache", "generate"):
        if name in errors and not errors[name] <= tolerance:
            broken.append((name, f"{name} differs by {errors[name]:.1e} > {tolerance:.0e}"))
    if errors.get("detach", 0.0) != 0.0:
        broken.append(("detach", f"detach left outputs or state_dict changed by {errors['detach']:.1e}"))
    messages = [result.message] if result.message else []
    for name, message in broken:
        if name not in result.failed:
            result.failed.append(name)
            messages.append(message)
    result.failed.sort(key=INVARIANTS.index)
    if result.failed:
        result.status = "fail"
        result.message = "; ".join(messages)
