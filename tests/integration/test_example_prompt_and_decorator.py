"""Runs examples/prompt_tuning_labels.py and examples/decorator_eval.py with fewer steps and checks
their claims against oracles outside our code: the base model's own answers before attaching, a
held-out split the adapter never trained on (against the majority-class baseline), and an explicit
``with`` block for the decorator."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import decorator_eval
import prompt_tuning_labels as ptl
from restoration import assert_untouched, snapshot, warm_up

from prefix_hooks import attach_prefix

MARGIN = 0.15  # held-out accuracy must beat the majority-class baseline by this much


def majority_baseline(rows: list[ptl.Row]) -> float:
    return max(Counter(label for _, label in rows).values()) / len(rows)


def test_base_tasks_never_show_the_complaint_task(tmp_path: Path) -> None:
    encoder = ptl.Encoder(ptl.build_tokenizer(tmp_path))
    examples = ptl.pretraining_examples(encoder)
    instruction = encoder.ids(ptl.INSTRUCTION)
    messages = [encoder.ids(text) for text, _ in ptl.read_tsv("complaints.tsv")]
    no_complaint = encoder.ids("no complaint") + [encoder.tokenizer.eos_token_id]
    for query, answer in examples:
        assert not any(query[i : i + len(instruction)] == instruction for i in range(len(query)))
        assert not any(query[i : i + len(m)] == m for m in messages for i in range(len(query)))
        assert answer != no_complaint
    train, held_out = ptl.complaint_split()
    assert not {text for text, _ in train} & {text for text, _ in held_out}
    assert len(held_out) == 24 and majority_baseline(held_out) == 0.5


@pytest.mark.slow
def test_prompt_tuning_example_learns_the_labels_only_inside() -> None:
    torch.set_num_threads(1)
    result = ptl.main(["--prompt-steps", "150"])  # the default base (600 steps, seed 2)
    held_out = result.held_out
    inside = ptl.accuracy(result.inside, held_out)
    assert inside >= majority_baseline(held_out) + MARGIN, (inside, result.inside)
    assert ptl.label_word_rate(result.inside) >= 0.9
    assert ptl.accuracy(result.at_init, held_out) < inside  # the training mattered, not the init alone
    assert ptl.label_word_rate(result.before) == 0.0  # the base model given the instruction as text
    assert result.after == result.before
    assert result.prompt_losses[-1] < result.prompt_losses[0]


@pytest.mark.slow
def test_decorator_example_equals_an_explicit_with_block(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = tmp_path / "prefix"
    result = decorator_eval.main(["--adapter-folder", str(folder)])  # the default steps
    model, encoder, held_out = result.model, result.encoder, result.held_out
    assert ptl.accuracy(result.decorated, held_out) >= majority_baseline(held_out) + MARGIN, result.decorated
    assert ptl.accuracy(result.undecorated, held_out) < majority_baseline(held_out)

    base = ptl.generate_answers(model, encoder, held_out, None)  # nothing attached
    assert result.undecorated == base
    with attach_prefix(model, folder):
        explicit = ptl.generate_answers(model, encoder, held_out, None)
    assert result.decorated == explicit

    warm_up(model)
    before = snapshot(model)
    assert result.evaluate(model, held_out[:3]) == explicit[:3]
    assert_untouched(model, before)
    assert ptl.generate_answers(model, encoder, held_out, None) == base
