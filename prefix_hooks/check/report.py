"""The results of ``python -m prefix_hooks.check``: a :class:`CellResult` per (family, method) cell, and the
:class:`CheckReport` that prints them as a table with a summary."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers

import prefix_hooks

Status = Literal["ok", "fail", "error", "refused"]


@dataclass
class CellResult:
    """One (family, method) cell of the check.

    Attributes:
        family, method: the cell (``family`` is a model type).
        variant: the family's tiny-model variant (``prefix_hooks.check.tiny_models.VARIANTS``), or "".
        status: ``ok``; ``fail`` (an invariant broke); ``error`` (an unexpected exception);
            ``refused`` (refused by design, before touching the model).
        errors: invariant -> the worst absolute error measured (``changes``: the largest change
            the adapter made, which must *exceed* :data:`~prefix_hooks.check.invariants.MIN_EFFECT`).
        failed: the invariants that broke, in checking order.
        message: the exception (``error``), the refusal (``refused``) or what broke (``fail``).
        warnings: distinct warnings raised while checking the cell (not failures).
        seconds: wall time of the cell.
    """

    family: str
    method: str
    variant: str = ""
    status: Status = "ok"
    errors: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def row(self) -> str:
        """The table row: the family, or ``family:variant``."""
        return f"{self.family}:{self.variant}" if self.variant else self.family

    @property
    def worst(self) -> float:
        """The worst error over the invariants that compare two computations (0.0 when none ran)."""
        measured = [error for name, error in self.errors.items() if name != "changes"]
        return max(measured, default=0.0)

    def text(self) -> str:
        """The table cell: ``1.2e-07``, ``FAIL 3.1e-01 (cache)``, ``ERROR TypeError: ...`` or ``refused``."""
        if self.status == "refused":
            return "refused"
        if self.status == "error":
            return f"ERROR {self.message}"
        if self.status == "fail":
            numbers = [self.errors[name] for name in self.failed if name in self.errors]
            number = f" {max(numbers):.1e}" if numbers else ""
            return f"FAIL{number} ({','.join(self.failed)})"
        return f"{self.worst:.1e}"


@dataclass
class CheckReport:
    """Every cell of one check, with the versions it ran against."""

    cells: list[CellResult]
    tolerance: float
    versions: dict[str, str]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No cell failed or raised unexpectedly."""
        return not self.problems()

    def problems(self) -> list[CellResult]:
        """The cells that failed or raised."""
        return [cell for cell in self.cells if cell.status in ("fail", "error")]

    def cell(self, family: str, method: str, variant: str = "") -> CellResult:
        """The result of ``method`` on ``family`` (its ``variant``, by default the plain tiny model).

        Raises:
            KeyError: the check did not run that cell.
        """
        for result in self.cells:
            if (result.family, result.method, result.variant) == (family, method, variant):
                return result
        raise KeyError(f"no cell {method} x {family}{':' + variant if variant else ''} in this report")

    def table(self, max_width: int = 34) -> str:
        """Families down, methods across; each cell's text cut to ``max_width`` characters."""
        families = list(dict.fromkeys(cell.row for cell in self.cells))
        methods = list(dict.fromkeys(cell.method for cell in self.cells))
        by_cell = {(cell.row, cell.method): cell.text() for cell in self.cells}

        def cut(text: str) -> str:
            return text if len(text) <= max_width else text[: max_width - 3] + "..."

        rows = [["family", *methods]]
        rows += [[family, *(cut(by_cell.get((family, method), "-")) for method in methods)] for family in families]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: counts per status, the time taken, and OK or FAILED."""
        statuses = [cell.status for cell in self.cells]
        counts = {status: statuses.count(status) for status in ("ok", "refused", "fail", "error")}
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"{verdict}: {len(self.cells)} cells, {counts['ok']} passed, {counts['refused']} refused by design, "
            f"{counts['fail']} failed, {counts['error']} errors (tolerance {self.tolerance:.0e}) "
            f"in {self.seconds:.1f} s"
        )

    def details(self) -> str:
        """What broke in every failing cell, in full, and the warnings seen (empty when there are none)."""
        lines = []
        for cell in self.problems():
            measured = ", ".join(f"{name} {error:.1e}" for name, error in cell.errors.items())
            lines.append(f"{cell.method} x {cell.row}: {cell.message}" + (f" [{measured}]" if measured else ""))
        seen: dict[str, list[str]] = {}
        for cell in self.cells:
            for text in cell.warnings:
                seen.setdefault(text, []).append(f"{cell.method} x {cell.row}")
        if seen:
            lines.append("notes (warnings seen while checking; not failures):")
        for text, where in seen.items():
            lines.append(f"  {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}: {text}")
        return "\n".join(lines)


def versions() -> dict[str, str]:
    """The versions the check runs against."""
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prefix_hooks": prefix_hooks.__version__,
        "python": platform.python_version(),
    }


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (empty for none), as a cell or a note shows it."""
    text = str(error).strip().splitlines()
    return text[0] if text else ""
