"""The library reports through :mod:`logging` and never prints, except the report users ask for."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import tiny_models

import prefix_hooks
from prefix_hooks import LoraConfig, PrefixTuningConfig, attach_lora, attach_prefix

PACKAGE = Path(prefix_hooks.__file__).parent
ALLOWED_PRINTS = {"print_trainable_parameters"}  # PEFT's API prints its report; so does ours
COMMANDS = {"check/cli.py"}  # command-line programs (``python -m prefix_hooks.check``) print their report


def print_calls() -> list[str]:
    """``file:line in function`` for every ``print(...)`` call in the package outside the allowed functions."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(PACKAGE)) in COMMANDS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            name = getattr(function, "name", "<module>")
            nested = {
                id(call)
                for inner in ast.walk(function)
                if inner is not function and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
                for call in ast.walk(inner)
            }
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"):
                    continue
                if id(node) not in nested and name not in ALLOWED_PRINTS:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} in {name}")
    return found


def test_the_library_does_not_print() -> None:
    assert print_calls() == []


def test_the_print_scan_finds_a_print(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "module.py").write_text("def report():\n    print('hello')\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert print_calls() == ["module.py:2 in report"]


def test_the_package_logger_is_silent_by_default() -> None:
    handlers = logging.getLogger("prefix_hooks").handlers
    assert any(isinstance(handler, logging.NullHandler) for handler in handlers)


def test_attach_and_detach_are_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_models.build_model("llama")
    with caplog.at_level(logging.INFO, logger="prefix_hooks"), attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2)):
        pass
    messages = [(record.name, record.levelno, record.getMessage()) for record in caplog.records]
    assert messages == [
        ("prefix_hooks.core.attachment", logging.INFO, "attached PrefixAttachment 'default' to LlamaForCausalLM"),
        (
            "prefix_hooks.core.attachment",
            logging.INFO,
            "detached PrefixAttachment 'default' from LlamaForCausalLM; the model is restored",
        ),
    ]


def test_a_failed_attach_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_models.build_model("llama")
    handle = attach_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with (
        attach_lora(model, LoraConfig(r=2, target_modules=["q_proj"])),
        caplog.at_level(logging.DEBUG, logger="prefix_hooks"),
        pytest.raises(RuntimeError, match="already attached"),
    ):
        handle.attach()
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage() == (
        "attaching LoraAttachment 'default' to LlamaForCausalLM was refused; the model is untouched"
    )


def test_a_failed_install_is_logged_at_debug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_models.build_model("llama")
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2))

    def fail(undo: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(handle, "_install", fail)
    with caplog.at_level(logging.DEBUG, logger="prefix_hooks"), pytest.raises(RuntimeError, match="injected"):
        handle.attach()
    assert [record.getMessage() for record in caplog.records] == [
        "attaching PrefixAttachment 'default' to LlamaForCausalLM failed; the model was restored"
    ]
