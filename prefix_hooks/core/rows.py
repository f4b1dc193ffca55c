"""Per-row adapter selection for one forward pass (a mixed-adapter batch).

The names live in a :class:`contextvars.ContextVar`, so they reach every LoRA layer of a
forward without any argument threading, and they are private to the thread or task that
set them. Row ``b`` of the batch gets the adapter named ``names[b]``; :data:`BASE_ROW`
(``"__base__"``, PEFT's placeholder) gives that row the base model.

Example::

    with adapter_rows_context(["sql", "__base__", "chat"]):
        logits = model(input_ids).logits  # input_ids: (3, T)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

BASE_ROW = "__base__"
"""The row name that selects the base model (no adapter) for that row."""

_ADAPTER_ROWS: ContextVar[tuple[str, ...] | None] = ContextVar("prefix_hooks_lora_adapter_rows", default=None)


def current_adapter_rows() -> tuple[str, ...] | None:
    """The adapter name of every batch row for the forward running now, or None (no per-row selection)."""
    return _ADAPTER_ROWS.get()


def validate_adapter_rows(names: Sequence[str]) -> tuple[str, ...]:
    """Check a per-row name list and return it as a tuple.

    Raises:
        TypeError: ``names`` is a bare string or holds something other than strings.
        ValueError: ``names`` is empty.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter row names must be a list or tuple of adapter names (one per batch row), got {names!r}"
        )
    rows = tuple(names)
    if not rows:
        raise ValueError("adapter row names must name one adapter (or '__base__') per batch row, got an empty list")
    bad = [name for name in rows if not isinstance(name, str)]
    if bad:
        raise TypeError(f"adapter row names must be strings (adapter names or '__base__'), got {bad[0]!r}")
    return rows


@contextmanager
def adapter_rows_context(names: Sequence[str] | None) -> Iterator[None]:
    """Select an adapter per batch row for the forwards run inside the block.

    Args:
        names: one adapter name per batch row (``"__base__"`` for the base model), or None
            to switch per-row selection off inside the block. Each LoRA layer checks that the
            length equals its input's batch size (dim 0). Inner blocks replace outer ones.

    Raises:
        TypeError / ValueError: see :func:`validate_adapter_rows`; raised before anything is set.
    """
    rows = None if names is None else validate_adapter_rows(names)
    token = _ADAPTER_ROWS.set(rows)
    try:
        yield
    finally:
        _ADAPTER_ROWS.reset(token)
