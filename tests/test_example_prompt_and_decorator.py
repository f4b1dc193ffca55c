"""Runs examples/prompt_tuning_labels.py and examples/decorator_eval.py with few steps and
checks their claims: label words inside the block (or the decorated call), the model's own
answers (the text's last word) outside it, identical before and after."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import decorator_eval
import prompt_tuning_labels

BASE_STEPS = "120"


def _last_words(rows: list[tuple[str, str]]) -> list[str]:
    return [text.split()[-1] for text, _ in rows]


@pytest.mark.slow
def test_prompt_tuning_example_generates_labels_only_inside() -> None:
    torch.set_num_threads(1)
    result = prompt_tuning_labels.main(["--base-steps", BASE_STEPS, "--prompt-steps", "5"])
    rows = result["rows"]
    assert prompt_tuning_labels.label_words_rate(result["before"]) == 0.0
    echoed = sum(got == word for got, word in zip(result["before"], _last_words(rows)))
    assert echoed >= 0.9 * len(rows)  # the base model's other task
    assert prompt_tuning_labels.label_accuracy(result["inside"], rows) >= 0.9
    assert result["after"] == result["before"]
    assert prompt_tuning_labels.label_accuracy(result["at_init"], rows) >= 0.9  # TEXT init alone
    assert len(result["losses"]) == 5


@pytest.mark.slow
def test_decorator_example_attaches_only_during_the_call() -> None:
    torch.set_num_threads(1)
    result = decorator_eval.main(["--base-steps", BASE_STEPS])
    rows = result["rows"]
    assert prompt_tuning_labels.label_words_rate(result["before"]) == 0.0
    assert prompt_tuning_labels.label_accuracy(result["decorated"], rows) >= 0.9
    assert result["after"] == result["before"]
    evaluate, baseline = result["evaluate"], result["baseline"]
    assert inspect.signature(evaluate) == inspect.signature(baseline)
    assert evaluate.__name__ == "evaluate" and evaluate.__doc__ == "Greedy answers of ``model`` to every row."
