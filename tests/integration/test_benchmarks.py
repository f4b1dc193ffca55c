"""The benchmark harness (``benchmarks/``) in its quick mode: every scenario x method row is
reported with finite positive numbers. Nothing here asserts anything about timings."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is not installed

from benchmarks.methods import METHODS
from benchmarks.report import COLUMNS, format_ratio
from benchmarks.run import QUICK, main
from benchmarks.scenarios import NOISE_FLOOR, Ratio

# The benchmarks run PEFT 0.21.2 as a contender, and it passes transformers 5.24+'s deprecated
# `past_key_values` keyword (alone, or beside `cache` in its generate()): transformers' FutureWarnings
# about PEFT's calls, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*`past_key_values`.*:FutureWarning")

MODELS = ("llama", "gpt2")
SCENARIOS = (
    f"forward {QUICK.batch}×{QUICK.seq_len}",
    f"train step {QUICK.batch}×{QUICK.seq_len}",
    f"train step {QUICK.batch}×{QUICK.seq_len} peak memory",
    *(f"generate {QUICK.new_tokens} after {length}" for length in QUICK.prompt_lens),
    *(
        f"decode {QUICK.decode_steps} after {length}{variant}"
        for length in QUICK.decode_contexts
        for variant in ("", ", positions + mask")
    ),
    "attach + detach",
    "build + attach + detach",
)
NO_BASE = frozenset({"attach + detach", "build + attach + detach"})
"""Scenarios without a base-model column."""
CONTROLLED = tuple(
    scenario for scenario in SCENARIOS if scenario not in NO_BASE and not scenario.endswith("peak memory")
)
"""Timed scenarios with a base model: they carry the A/A noise-floor row."""
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
    expected = [
        (model, scenario, name)
        for model in MODELS
        for scenario in SCENARIOS
        for name, method in METHODS.items()
        if method.trains or not scenario.startswith("train step")
    ]
    expected += [(model, scenario, NOISE_FLOOR) for model in MODELS for scenario in CONTROLLED]
    layers, width = QUICK.skeleton
    expected.append((f"llama {layers}×{width} (meta)", "build + attach + detach", "lora r=8 all-linear"))
    assert sorted(keys) == sorted(expected)


def test_numbers_are_finite_and_positive(quick_markdown: str) -> None:
    for row in table_rows(quick_markdown):
        for column in NUMBER_COLUMNS:
            if row["scenario"] in NO_BASE and column in ("base", "ours/base", "PEFT/base"):
                assert row[column] == "—", row
                continue
            if row["method"] == NOISE_FLOOR and column in ("PEFT", "PEFT/base", "ours/PEFT"):
                assert row[column] == "—", row  # the control has no PEFT counterpart
                continue
            value = float(row[column].split(" ")[0])  # a ratio cell may add its quartiles: "1.01 (0.98–1.03)"
            assert math.isfinite(value) and value > 0, (column, row)


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


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    """Drift that slows both contenders alike cancels in a paired ratio, not in a ratio of medians."""
    ours = [1.0, 2.0, 4.0, 8.0, 16.0]
    base = [0.5, 1.0, 2.0, 4.0, 8.0]  # every round exactly half of ours
    assert Ratio.paired(ours, base) == Ratio(2.0, 2.0, 2.0)
    ratio = Ratio.paired([3.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    assert ratio.median == 2.0 and ratio.low == 1.5 and ratio.high == 2.5
    assert format_ratio(ratio) == "2 (1.5–2.5)"
    assert format_ratio(Ratio.paired([2.0], [1.0])) == "2"


def test_scenario_filter_runs_only_those() -> None:
    report = main(["--quick", "--repeats", "1", "--threads", "1", "--models", "gpt2", "--scenarios", "attach"])
    assert {row.scenario for row in report.rows} == {"attach + detach", "build + attach + detach"}


def test_method_filter_runs_only_those() -> None:
    name = next(iter(METHODS))
    report = main(["--quick", "--repeats", "1", "--threads", "1", "--models", "gpt2", "--scenarios", "forward",
                   "--methods", name])
    assert {row.method for row in report.rows} == {name, NOISE_FLOOR}


def test_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    main(["--quick", "--repeats", "1", "--threads", str(before + 1), "--models", "gpt2"])
    assert torch.get_num_threads() == before


def test_operator_counts_cover_every_scenario_and_a_merged_adapter_adds_none() -> None:
    """``benchmarks.opcount`` (deterministic, unlike timings): a merged LoRA dispatches exactly the
    base model's operators, and every other adapter dispatches more than the base."""
    from benchmarks import opcount

    counts = opcount.main(["--quick", "--methods", "lora r=8 merged", "ia3"])
    keys = {(count.model, count.scenario, count.method) for count in counts}
    expected = {(model, scenario, "ia3") for model in MODELS for scenario in opcount.SCENARIOS}
    expected |= {(model, scenario, "lora r=8 merged") for model in MODELS for scenario in opcount.SCENARIOS
                 if scenario != "train step"}  # merged adapters do not train
    assert keys == expected
    for count in counts:
        if count.method == "lora r=8 merged":
            assert count.ours == count.base == count.peft, count
        else:
            assert count.ours > count.base and count.peft > count.base, count


def test_a_prefix_decode_step_costs_a_few_operators_per_layer() -> None:
    """The decode-loop rows' operator counts: a steady single-token step with a prefix dispatches at most
    4 operators per layer (plus a constant) more than the base model's (issue 19's target)."""
    from benchmarks import opcount

    counts = opcount.main(["--quick", "--methods", "prefix P=20", "prefix P=20 + projection"])
    decode = [count for count in counts if count.scenario in (opcount.DECODE, opcount.DECODE_EXPLICIT)]
    assert len(decode) == 2 * 2 * len(MODELS)
    for count in decode:
        layers = 2  # the quick models'
        assert count.ours - count.base <= 4 * layers + 4, count


def test_the_gpu_benchmark_runs_its_code_on_cpu() -> None:
    """``benchmarks.gpu`` is run on a lent GPU only; its code runs here on CPU (tiny models, one round),
    one finite positive row per model, method and scenario."""
    from benchmarks import gpu

    rows = gpu.main(["--device", "cpu", "--quick", "--repeats", "1"])
    assert len(rows) == 3 * len(gpu.DEFAULT_METHODS) * 5  # forward, train step, generate x2, decode
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        ratios = [float(cell.split(" ")[0]) for cell in cells[3:]]
        assert all(math.isfinite(ratio) and ratio > 0 for ratio in ratios), row
