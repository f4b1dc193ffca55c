"""examples/sentence_classification.py, run reduced (30 Trainer steps) so that it cannot rot.

Claims checked: prefix tuning + Trainer on the real MiniLM beats the random head; the model is
bit-identical after the block; the saved folder has PEFT's keys (prefix and classifier copy)
and a fresh model with a different head reproduces the trained logits exactly.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file
from shared_fixtures import load_example

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sentence_classification.py"
STEPS = 30
P = 4


def _load_example() -> ModuleType:
    return load_example(EXAMPLE, "sentence_classification_example")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_example()


def test_the_data_set_is_balanced_and_split_without_overlap(example: ModuleType) -> None:
    train, test = example.load_sentences()
    assert (len(train), len(test)) == (160, 40)
    assert Counter(label for _, label in train) == {0: 80, 1: 80}
    assert Counter(label for _, label in test) == {0: 20, 1: 20}
    sentences = [sentence for sentence, _ in train + test]
    assert len(set(sentences)) == 200  # no sentence twice, so none in both splits


@pytest.mark.slow
def test_reduced_example_trains_restores_and_reloads(example: ModuleType, tmp_path: Path) -> None:
    result = example.main(["--steps", str(STEPS), "--virtual-tokens", str(P), "--no-progress",
                           "--output-dir", str(tmp_path)])
    assert result.accuracy_after >= 0.75 and result.accuracy_after > result.accuracy_before + 0.15, result
    assert result.train_losses[-1] < result.train_losses[0], result.train_losses
    assert result.logits_restored and result.accuracy_outside == result.accuracy_before
    assert result.reload_max_diff <= 1e-5 and result.accuracy_reloaded == result.accuracy_after

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    layers, hidden = 6, 384
    assert saved["prompt_embeddings"].shape == (P, layers * 2 * hidden)  # PEFT's prefix layout
    head = {key: tensor.shape for key, tensor in saved.items() if key != "prompt_embeddings"}
    # PEFT's key for a prompt-learning model's trained head copy (PeftModel.base_model is the model itself)
    assert head == {"base_model.classifier.weight": (2, hidden), "base_model.classifier.bias": (2,)}, head


def test_bad_options_are_refused(example: ModuleType) -> None:
    with pytest.raises(SystemExit):
        example.main(["--steps", "0"])
