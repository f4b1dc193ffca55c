"""``python -m prefix_hooks.check``: passes on healthy families, and fails loudly when the library breaks.

The check runs in-process (``run_check`` / ``main``) on a few families; two deliberate
breakages (a llama adapter whose positions ignore the cache, an attach that changes nothing)
and a third (a detach that restores nothing) must each make the command exit non-zero with
the broken invariant in the table. One subprocess run covers ``python -m prefix_hooks.check``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from prefix_hooks import supported
from prefix_hooks.check import METHODS, MIN_EFFECT, TOLERANCE, main, run_check
from prefix_hooks.check import tiny_models as check_models
from prefix_hooks.core.attachment import UndoStack
from prefix_hooks.families import ArchitectureAdapter, PositionInputs, llama, register_family
from prefix_hooks.lora import LoraAttachment

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llama", "gpt2", "t5", "bert", "vit")  # a decoder, an inline-cache decoder, seq2seq, encoder, vision
HEADER = ("family", *METHODS)


class _CacheBlindAdapter(ArchitectureAdapter):
    """Llama's adapter with a bug: positions start at the offset on every call, as if nothing were cached."""

    def position_ids(self, inputs: PositionInputs, offset: int) -> torch.Tensor:
        return super().position_ids(dataclasses.replace(inputs, past_len=0), offset)


@pytest.fixture
def cache_blind_llama() -> Iterator[None]:
    original = llama.ADAPTER
    fields = {field.name: getattr(original, field.name) for field in dataclasses.fields(original)}
    register_family(_CacheBlindAdapter(**fields), replace=True)
    try:
        yield
    finally:
        register_family(original, replace=True)


def _row(output: str, family: str) -> str:
    """The table line of ``family``."""
    return next(line for line in output.splitlines() if line.split()[:1] == [family])


def test_every_supported_family_has_a_tiny_model() -> None:
    assert sorted(check_models.FAMILIES) == sorted(supported())
    assert set(check_models.VARIANTS) <= set(check_models.KINDS["decoder-only"])


def test_run_check_on_healthy_families_passes_every_invariant() -> None:
    report = run_check(FAMILIES)

    assert report.ok, report.details()
    assert [(cell.family, cell.method) for cell in report.cells] == [(f, m) for f in FAMILIES for m in METHODS]
    llama_prefix = report.cell("llama", "prefix")
    assert set(llama_prefix.errors) == {"changes", "cache", "generate", "detach"}
    assert llama_prefix.errors["changes"] > MIN_EFFECT
    assert llama_prefix.worst <= TOLERANCE and llama_prefix.errors["detach"] == 0.0
    assert set(report.cell("bert", "lora").errors) == {"changes", "detach"}  # no cache to check
    assert report.cell("vit", "prompt").status == "refused"
    assert "vit" in report.cell("vit", "p-tuning").message  # the refusal names the model type


def test_main_prints_versions_table_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--families", ",".join(FAMILIES), "--quiet"])

    output = capsys.readouterr().out
    assert status == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("prefix_hooks self-check: transformers ")
    assert any(line.split() == list(HEADER) for line in lines)
    assert _row(output, "vit").split()[1:] == ["0.0e+00", "0.0e+00", "refused", "refused", "0.0e+00"]
    assert lines[-1].startswith("OK: 25 cells, 23 passed, 2 refused by design, 0 failed, 0 errors")


def test_families_expand_to_their_variants() -> None:
    report = run_check(["falcon:alibi", "mistral"], ["lora"])
    assert [cell.row for cell in report.cells] == ["falcon:alibi", "mistral", "mistral:window"]
    with pytest.raises(ValueError, match="unknown variant 'falcon:wide'"):
        run_check(["falcon:wide"])


def test_unknown_family_or_method_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--families", "llama,notamodel"])
    assert exit_info.value.code == 2
    assert "unknown family 'notamodel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "prefix,adapters"])


@pytest.mark.usefixtures("cache_blind_llama")
def test_positions_that_ignore_the_cache_fail_the_cache_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--families", "llama", "--methods", "prefix,lora", "--quiet"])

    output = capsys.readouterr().out
    assert status == 1
    row = _row(output, "llama").split()  # llama FAIL <error> (cache...) <lora's error>
    assert row[1] == "FAIL" and row[3].startswith("(cache")
    assert float(row[-1]) <= TOLERANCE
    assert output.splitlines()[-1].startswith("FAILED: 2 cells, 1 passed, 0 refused by design, 1 failed")
    report = run_check(["llama"], ["prefix"])
    cell = report.cell("llama", "prefix")
    assert cell.status == "fail" and cell.failed[0] == "cache"
    assert cell.errors["cache"] > 10 * TOLERANCE


def test_an_attach_that_changes_nothing_fails_the_changes_invariant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(LoraAttachment, "_install", lambda self, undo: None)

    status = main(["--families", "llama", "--methods", "lora", "--quiet"])

    assert status == 1
    assert "FAIL 0.0e+00 (changes)" in _row(capsys.readouterr().out, "llama")


def test_a_detach_that_restores_nothing_fails_the_detach_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UndoStack, "unwind", lambda self: None)

    report = run_check(["llama"], ["ia3"])

    cell = report.cell("llama", "ia3")
    assert not report.ok
    assert cell.failed == ["detach"] and cell.errors["detach"] > 0
    assert cell.text().startswith("FAIL ") and cell.text().endswith("(detach)")


def test_an_unexpected_exception_is_an_error_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_install(self: LoraAttachment, undo: UndoStack) -> None:
        raise TypeError("boom")

    monkeypatch.setattr(LoraAttachment, "_install", broken_install)

    cell = run_check(["gpt2"], ["lora"]).cell("gpt2", "lora")

    assert cell.status == "error" and cell.text() == "ERROR TypeError (attach): boom"


@pytest.mark.slow
def test_the_command_runs_as_a_module() -> None:
    command = [sys.executable, "-m", "prefix_hooks.check", "--families", "llama,gpt2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("prefix_hooks self-check: transformers ")
    assert any(line.split() == list(HEADER) for line in lines)
    assert "x llama" in result.stderr  # progress, one line per cell
    assert lines[-1].startswith("OK: 10 cells, 10 passed")
