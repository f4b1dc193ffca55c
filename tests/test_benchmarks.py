"""The benchmark harness (``benchmarks/``) in its quick mode: every scenario x method row is
reported with finite positive numbers. Nothing here asserts anything about timings."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

from benchmarks.methods import METHODS
from benchmarks.report import COLUMNS
from benchmarks.run import QUICK, main

MODELS = ("llama", "gpt2")
SCENARIOS = (
    f"forward {QUICK.batch}×{QUICK.seq_len}",
    f"train step {QUICK.batch}×{QUICK.seq_len}",
    f"train step {QUICK.batch}×{QUICK.seq_len} peak memory",
    *(f"generate {QUICK.new_tokens} after {length}" for length in QUICK.prompt_lens),
    "attach + detach",
    "build + attach + detach",
)
NO_BASE = frozenset({"attach + detach", "build + attach + detach"})
NUMBER_COLUMNS = ("base", "prefix_hooks", "PEFT", "ours/base", "PEFT/base", "ours/PEFT")


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The results table's body rows as ``column -> cell``."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert tuple(header) == COLUMNS
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


@pytest.fixture(scope="module")
def quick_markdown(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The results file of one quick run, single-threaded, one round."""
    output = tmp_path_factory.mktemp("benchmarks") / "BENCHMARKS.md"
    main(["--quick", "--repeats", "1", "--threads", "1", "--output", str(output)])
    return output.read_text()


def test_every_scenario_and_method_has_a_row(quick_markdown: str) -> None:
    keys = [(row["model"], row["scenario"], row["method"]) for row in table_rows(quick_markdown)]
    expected = [(model, scenario, method) for model in MODELS for scenario in SCENARIOS for method in METHODS]
    assert sorted(keys) == sorted(expected)


def test_numbers_are_finite_and_positive(quick_markdown: str) -> None:
    for row in table_rows(quick_markdown):
        for column in NUMBER_COLUMNS:
            if row["scenario"] in NO_BASE and column in ("base", "ours/base", "PEFT/base"):
                assert row[column] == "—", row
                continue
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (column, row)
        if row["spread"] != "—":  # one sample (the memory) has no spread
            spread = float(row["spread"].removesuffix("%"))
            assert math.isfinite(spread) and spread >= 0, row


def test_report_names_machine_versions_and_methods(quick_markdown: str) -> None:
    for needle in (
        "Machine:",
        "torch threads: 1",
        "transformers ",
        "peft ",
        "prefix_hooks ",
        "Date:",
        "profile_memory=True",
        "get_peft_model",
    ):
        assert needle in quick_markdown


def test_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    main(["--quick", "--repeats", "1", "--threads", str(before + 1), "--models", "gpt2"])
    assert torch.get_num_threads() == before
