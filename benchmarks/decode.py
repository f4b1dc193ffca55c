"""The decode loop of streaming servers and chat UIs: a user cache, one prefill, then single-token forwards.

``generate()`` is one way to decode; a server that streams tokens usually writes the loop
itself::

    cache = DynamicCache()
    model(input_ids=prompt, past_key_values=cache, use_cache=True)          # prefill
    for token in tokens:
        model(input_ids=token, past_key_values=cache, use_cache=True)       # one step each

(the keyword is ``cache`` on transformers 5.24+). A :class:`DecodeLoop` is that loop for
one contender, prefilled once and rewound (``cache.crop``) after every run, so every timed
round decodes the same steps from the same cache.

PEFT's prompt-learning models (prefix tuning, prompt tuning, P-tuning) cannot take a step
through their own ``forward``: it puts the virtual tokens in front again on every call (prompt
tuning) or replaces the cache with a fresh prefix (prefix tuning). A PEFT user therefore
prefills through the PEFT model, whose cache then holds the ``P`` virtual positions, and steps
through the base model it wraps; :func:`peft_decode_loop` does that, and its masks and
positions count those ``P`` cached positions as the base model expects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn
from transformers import DynamicCache

from benchmarks.measure import Operation, interleave
from benchmarks.models import random_tokens
from benchmarks.scenarios import INPUT_SEED, PARITY_ATOL, Bound, Contender, Contenders, Row, Workload, measured, rows_from
from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters, output_cache


@dataclass(frozen=True)
class DecodeInputs:
    """What every contender decodes.

    Attributes:
        prompt: ``(1, T)`` token ids of the prefill.
        tokens: ``(1, steps)`` token ids fed one per step.
        explicit: pass ``position_ids`` and an all-ones ``attention_mask`` on every step (as a
            server batching its own requests does); otherwise neither, the model derives both from the cache.
    """

    prompt: torch.Tensor
    tokens: torch.Tensor
    explicit: bool

    @property
    def steps(self) -> int:
        return self.tokens.shape[1]


class DecodeLoop:
    """One contender's prefilled cache and its decode steps.

    Args:
        step_model: what each single-token step calls.
        prefill_model: what the prefill calls (``step_model`` unless PEFT's prompt learning).
        inputs: the prompt and the step tokens.
        peft_prompt: PEFT's prompt learning: the prefill makes its own cache (prefix tuning
            replaces a given one), and positions and masks count its ``P`` virtual positions,
            as the base model stepping through it expects.
        refill: prefill again, untimed, before every timed run; for our prompt adapters, whose
            cache is accepted only within the attach it was filled in, while the benchmark
            attaches around each run.

    Build it (the first prefill runs in ``__init__``) with any adapter already attached.
    """

    def __init__(
        self,
        step_model: nn.Module,
        prefill_model: nn.Module,
        inputs: DecodeInputs,
        *,
        peft_prompt: bool = False,
        refill: bool = False,
    ) -> None:
        self.step_model, self.prefill_model, self.inputs = step_model, prefill_model, inputs
        self.keyword = _cache_keyword(step_model)
        self.peft_prompt, self.refill = peft_prompt, refill
        self.prefill()

    @torch.no_grad()
    def prefill(self) -> None:
        """Fill a fresh cache with the prompt."""
        if self.peft_prompt:
            cache = output_cache(self.prefill_model(input_ids=self.inputs.prompt, use_cache=True))
            if cache is None:
                raise RuntimeError(f"{type(self.prefill_model).__name__} returned no cache from the prefill")
        else:
            cache = DynamicCache()
            self.prefill_model(input_ids=self.inputs.prompt, use_cache=True, **{_cache_keyword(self.prefill_model): cache})
        self.cache = cache
        self.length = cache.get_seq_length()
        """Cached positions after the prefill (``T``, or ``P + T`` when the cache holds virtual tokens)."""
        virtual = self.length - self.inputs.prompt.shape[1] if self.peft_prompt else 0
        self._step_kwargs = [self._kwargs(step, virtual) for step in range(self.inputs.steps)]

    def _kwargs(self, step: int, virtual: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": self.inputs.tokens[:, step : step + 1], "use_cache": True}  # (1, 1)
        if self.inputs.explicit:
            seen = virtual + self.inputs.prompt.shape[1] + step  # positions before this token
            kwargs["position_ids"] = torch.tensor([[seen]])  # (1, 1)
            kwargs["attention_mask"] = torch.ones(1, seen + 1, dtype=torch.long)  # (1, seen + 1)
        return kwargs

    @torch.no_grad()
    def run(self, steps: int | None = None) -> torch.Tensor:
        """Decode ``steps`` tokens (default: all), rewind the cache, return the last step's logits ``(1, 1, V)``."""
        logits = torch.empty(0)
        try:
            for kwargs in self._step_kwargs[: steps or self.inputs.steps]:
                logits = self.step_model(**kwargs, **{self.keyword: self.cache}).logits  # (1, 1, V)
        finally:
            self.rewind()
        return logits

    @torch.no_grad()
    def next_step(self) -> torch.Tensor:
        """Decode the next step token without rewinding (a steady-state step); its logits ``(1, 1, V)``."""
        decoded = self.cache.get_seq_length() - self.length
        return self.step_model(**self._step_kwargs[decoded], **{self.keyword: self.cache}).logits  # (1, 1, V)

    def seconds(self) -> float:
        """Wall time of all the steps (``time.perf_counter``), prefilling first if ``refill``."""
        if self.refill:
            self.prefill()
        start = time.perf_counter()
        self.run()
        return time.perf_counter() - start

    def rewind(self) -> None:
        """Drop every position decoded after the prefill."""
        decoded = self.cache.get_seq_length() - self.length
        if decoded:
            self.cache.crop(-decoded)  # a negative count removes that many (5.25 refuses a positive length)


def peft_decode_loop(peft_model: peft.PeftModel, inputs: DecodeInputs) -> DecodeLoop:
    """The loop a PEFT user writes: through the PEFT model, or for prompt learning a prefill
    through it and the steps through the base model it wraps (see the module docstring)."""
    if peft_model.active_peft_config.is_prompt_learning:
        return DecodeLoop(peft_model.get_base_model(), peft_model, inputs, peft_prompt=True)
    return DecodeLoop(peft_model, peft_model, inputs)


def _cache_keyword(model: nn.Module) -> str:
    target = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    keyword = cache_keyword(forward_parameters(target))
    if keyword is None:
        raise TypeError(f"{type(target).__name__}.forward takes no cache argument")
    return keyword


def decode_rows(contenders: Contenders, workload: Workload, context_len: int, explicit: bool) -> list[Row]:
    """``workload.decode_steps`` single-token steps after a ``context_len`` prefill, batch 1, in
    tokens/s (steps over the wall time of all of them; the prefill is not timed, see :meth:`DecodeLoop.seconds`).

    Each contender decodes from its own prefilled cache (ours prefilled with the adapter
    attached); first, ours is checked to decode what the same model computes without a cache.

    Raises:
        AssertionError: ours' last decode step differs from the uncached forward by more than
            ``PARITY_ATOL``.
    """
    base = contenders.base
    inputs = DecodeInputs(
        prompt=random_tokens(base, 1, context_len, INPUT_SEED),  # (1, T)
        tokens=random_tokens(base, 1, workload.decode_steps, INPUT_SEED + 1),  # (1, steps)
        explicit=explicit,
    )
    operations: dict[Contender, Bound] = {
        Contender("base"): (DecodeLoop(base, base, inputs).seconds, None),
        Contender("base again"): (DecodeLoop(base, base, inputs).seconds, None),
    }
    for name, handle in contenders.handles.items():
        with handle:
            loop = DecodeLoop(base, base, inputs, refill=handle.virtual_tokens == "prompt")
            _check_decodes_like_forward(loop, f"{contenders.model_name}/{name}")
        operations[Contender("ours", name)] = (loop.seconds, handle)
        operations[Contender("peft", name)] = (peft_decode_loop(contenders.peft_models[name], inputs).seconds, None)
    recorded = interleave(measured(operations, _returned_seconds), workload.repeats, workload.warmup)
    steps = workload.decode_steps
    scenario = f"decode {steps} after {context_len}" + (", positions + mask" if explicit else "")
    return rows_from(contenders.model_name, recorded, scenario, "tokens/s", lambda seconds: steps / seconds)


def _returned_seconds(operation: Operation) -> float:
    """The seconds ``operation`` reports it took (a :data:`~benchmarks.measure.Measure` for :meth:`DecodeLoop.seconds`)."""
    return float(operation())


@torch.no_grad()
def _check_decodes_like_forward(loop: DecodeLoop, where: str) -> None:
    """The loop's last step against one uncached forward over prompt + step tokens (adapter attached)."""
    decoded = loop.run()[0, -1]  # (V,)
    whole = torch.cat([loop.inputs.prompt, loop.inputs.tokens], dim=1)  # (1, T + steps)
    expected = loop.step_model(input_ids=whole, use_cache=False).logits[0, -1]  # (V,)
    gap = (decoded - expected).abs().max().item()
    assert gap < PARITY_ATOL, f"{where}: decoding with a cache differs from the uncached forward by {gap}"
