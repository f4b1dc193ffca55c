"""Measuring: interleaved rounds with a rotating order; elapsed time or peak CPU memory of one call."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from torch.profiler import ProfilerActivity, profile

from prefix_hooks import Attachment

K = TypeVar("K", bound=Hashable)
Operation = Callable[[], Any]
Measure = Callable[[Operation], float]
"""Runs an operation once and returns what was measured (seconds, bytes)."""
Sample = Callable[[], float]
"""One measurement, ready to repeat."""

MEMORY_METHOD = (
    "Peak memory: one training step under `torch.profiler.profile(activities=[CPU], profile_memory=True)`; "
    "its allocation events (`[memory]`: +bytes on allocation, -bytes on free) are walked in time order and "
    "the maximum of their running sum is reported. That is the peak of memory allocated through PyTorch's "
    "CPU allocator *during* the step above what was live when it started: weights, adapter parameters and "
    "AdamW state (created in the warm-up) are excluded; activations, gradients and temporaries are included. "
    "The profiler reports no free of a block allocated before it started, so the previous step's adapter "
    "gradients (released by `zero_grad`) still count: an overestimate by at most their size, a fraction of a MiB here."
)


def elapsed_seconds(operation: Operation) -> float:
    """Wall-clock seconds of one run of ``operation`` (``time.perf_counter``)."""
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def peak_allocated_bytes(operation: Operation) -> float:
    """Peak bytes allocated on CPU while ``operation`` runs, above the level at its start.

    See :data:`MEMORY_METHOD`.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        operation()
    assert profiler.profiler is not None and profiler.profiler.kineto_results is not None
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, running)
    return float(peak)


def sample(measure: Measure, operation: Operation, handle: Attachment | None = None) -> Sample:
    """``measure(operation)`` as a repeatable sample; with ``handle`` attached around it (not measured)."""

    def run() -> float:
        if handle is None:
            return measure(operation)
        with handle:
            return measure(operation)

    return run


def interleave(samples: Mapping[K, Sample], repeats: int, warmup: int) -> dict[K, list[float]]:
    """Run every sample ``warmup`` times unrecorded, then ``repeats`` recorded rounds.

    Round ``r`` runs all of them in turn starting at the ``r``-th (the order rotates),
    so drift in machine load spreads evenly over the contenders.

    Returns:
        key -> the ``repeats`` recorded values, in round order.
    """
    keys = list(samples)
    for _ in range(warmup):
        for key in keys:
            samples[key]()
    recorded: dict[K, list[float]] = {key: [] for key in keys}
    for round_index in range(repeats):
        start = round_index % len(keys)
        for key in keys[start:] + keys[:start]:
            recorded[key].append(samples[key]())
    return recorded
