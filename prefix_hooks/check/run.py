"""Running ``python -m prefix_hooks.check``: the cells of the families and methods asked for, each with
the warnings (and the ``transformers`` logger's messages) it raised collected as notes."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from prefix_hooks import supported
from prefix_hooks.check import tiny_models
from prefix_hooks.check.adapters import METHODS
from prefix_hooks.check.cells import check_cell
from prefix_hooks.check.invariants import TOLERANCE
from prefix_hooks.check.report import CellResult, CheckReport, first_line, versions


def run_check(
    families: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
    progress: Callable[[CellResult], None] | None = None,
) -> CheckReport:
    """Check ``methods`` (default: all) on tiny models of ``families`` (default: every supported one).

    Runs single-threaded (``torch.set_num_threads(1)``, restored after): tiny models are fastest so.

    Args:
        families: model types, each in :func:`prefix_hooks.supported`, with all their variants
            (``prefix_hooks.check.tiny_models.VARIANTS``), or one variant as ``family:variant``; a
            supported type without a tiny model gives an ``error`` cell.
        methods: among :data:`~prefix_hooks.check.adapters.METHODS`.
        tolerance: the absolute error ``cache`` and ``generate`` may reach.
        progress: called with each cell's result as soon as it is known.

    Returns:
        the report, one :class:`CellResult` per (family or variant, method).

    Raises:
        ValueError: an unknown family, variant or method.
    """
    rows = table_rows(families)
    methods = list(methods) if methods is not None else list(METHODS)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {', '.join(unknown)}; accepted: {', '.join(METHODS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    cells = []
    try:
        for family, variant in rows:
            for method in methods:
                cell_start = time.perf_counter()
                with warnings.catch_warnings(record=True) as records, _captured_transformers_logs() as logs:
                    warnings.simplefilter("always")
                    if family in tiny_models.FAMILIES:
                        cell = check_cell(family, variant, method, tolerance)
                    else:
                        cell = CellResult(family, method, status="error", message="no tiny model in this check")
                said = [_warning_text(record) for record in records] + logs.messages
                cell.warnings = list(dict.fromkeys(said))
                cell.seconds = time.perf_counter() - cell_start
                cells.append(cell)
                if progress is not None:
                    progress(cell)
    finally:
        torch.set_num_threads(threads)
    return CheckReport(cells, tolerance, versions(), time.perf_counter() - start)


def table_rows(names: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(family, variant)`` rows for ``names`` (default: every supported family, in the tiny
    models' order, which is the one of docs/families.md), each family followed by its variants.

    Raises:
        ValueError: a name that is no supported family, or no variant of one.
    """
    if names is None:
        known = [family for family in tiny_models.FAMILIES if family in supported()]
        names = known + [family for family in supported() if family not in known]
    rows: list[tuple[str, str]] = []
    for name in names:
        family, _, variant = name.partition(":")
        if family not in supported():
            raise ValueError(f"unknown family {family!r}; supported: {', '.join(supported())}")
        variants = tuple(tiny_models.VARIANTS.get(family, {}))
        if variant and variant not in variants:
            raise ValueError(f"unknown variant {name!r}; {family} has {', '.join(variants) or 'none'}")
        rows += [(family, variant)] if variant else [(family, ""), *((family, each) for each in variants)]
    return list(dict.fromkeys(rows))


def _cut(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warning_text(record: warnings.WarningMessage) -> str:
    return _cut(f"{record.category.__name__}: {first_line(Warning(str(record.message)))}")


class _LogRecords(logging.Handler):
    """Collects what the ``transformers`` logger says (warning and up) instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(_cut(f"transformers logged: {first_line(Warning(record.getMessage()))}"))


@contextlib.contextmanager
def _captured_transformers_logs() -> Iterator[_LogRecords]:
    """Route the ``transformers`` logger to a collector (its own handlers are put back after)."""
    logger = logging.getLogger("transformers")
    handlers, propagate = logger.handlers[:], logger.propagate
    collector = _LogRecords()
    logger.handlers[:] = [collector]
    logger.propagate = False
    try:
        yield collector
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate
