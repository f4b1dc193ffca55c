"""The command line of the self-check: ``python -m prefix_hooks.check [--families ...] [--methods ...]``
prints the versions, a family x method table with the worst error per cell, and a summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prefix_hooks import supported
from prefix_hooks.check.adapters import METHODS
from prefix_hooks.check.invariants import MIN_EFFECT, TOLERANCE
from prefix_hooks.check.report import CellResult, versions
from prefix_hooks.check.run import run_check, table_rows


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0: every cell passed or was refused by design)."""
    parser = argparse.ArgumentParser(
        prog="python -m prefix_hooks.check",
        description="Attach every method to a tiny model of every supported family and check that the adapter "
        "changes the output, cached decoding equals uncached, and detach restores the model bit-exactly.",
    )
    parser.add_argument(
        "--families", type=_names,
        help=f"comma-separated model types, each with its variants, or one variant as family:variant (default: "
        f"all {len(supported())} supported)",
    )
    parser.add_argument("--methods", type=_names, help=f"comma-separated, among {','.join(METHODS)} (default: all)")
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help=f"absolute, float32 (default {TOLERANCE:.0e})"
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress while checking")
    args = parser.parse_args(argv)
    try:
        table_rows(args.families)
    except ValueError as error:
        parser.error(str(error))
    unknown = [method for method in args.methods or () if method not in METHODS]
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; accepted: {', '.join(METHODS)}")

    print("prefix_hooks self-check: " + ", ".join(f"{name} {version}" for name, version in versions().items()))
    print(
        f"invariants: the adapter changes the output (> {MIN_EFFECT:.0e}); detach restores outputs and state_dict "
        f"bit-exactly; on families that decode, incremental forward == full forward and cached == uncached "
        f"generate() (within {args.tolerance:.0e}). Cells: the worst error, FAIL <error> (<invariant>), ERROR, or "
        "refused (by design)."
    )
    sys.stdout.flush()

    def progress(cell: CellResult) -> None:
        if not args.quiet:
            print(f"  {cell.method:<8} x {cell.row:<18} {cell.text()[:60]}", file=sys.stderr, flush=True)

    report = run_check(args.families, args.methods, args.tolerance, progress=progress)
    print()
    print(report.table())
    details = report.details()
    if details:
        print()
        print(details)
    print()
    print(report.summary())
    return 0 if report.ok else 1
