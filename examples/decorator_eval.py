"""Decorator form: an existing evaluation function gains a saved adapter with one added line.

The script trains a prefix for the complaint task of ``examples/prompt_tuning_labels.py``
(same data, tokenizer and base model, built by that example's functions) and saves it to a
folder, as an earlier training run would. Then comes an ordinary evaluation script whose only
adapter code is the line marked ``# added``::

    @attach_prefix(model, adapter_folder)  # added
    def evaluate(model, rows): ...

Each call of ``evaluate`` runs with the saved prefix attached (loaded once, frozen, when the
decorator is applied); everything else in the script, including ``evaluate.__wrapped__`` (the
same function undecorated), runs on the untouched base model.

Runs in under a minute on 2 CPU cores: ``python examples/decorator_eval.py`` (``--help`` for
the options). No network access is needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prompt_tuning_labels import (
    Encoder,
    Row,
    accuracy,
    batches,
    build_base_model,
    build_tokenizer,
    complaint_split,
    generate_answers,
    label_word_rate,
    train,
)
from transformers import LlamaForCausalLM

from prefix_hooks import PrefixTuningConfig, attach_prefix


def train_and_save_prefix(
    model: LlamaForCausalLM, encoder: Encoder, rows: list[Row], folder: Path, steps: int, virtual_tokens: int, seed: int
) -> None:
    """The earlier training run: a prefix trained on ``rows`` (answers ``complaint`` / ``no complaint``)."""
    with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=virtual_tokens)) as handle:
        examples = [encoder.example(text, label, None) for text, label in rows]
        train(
            model,
            list(handle.parameters()),
            batches(encoder, examples, 24, seed),
            steps,
            lr=1e-1,
            desc="prefix, complaint labels",
        )
        handle.save(folder)


@dataclass
class Result:
    """What the example measured (its test asserts on it)."""

    model: LlamaForCausalLM
    encoder: Encoder
    adapter_folder: Path
    held_out: list[Row]
    evaluate: Callable[[LlamaForCausalLM, list[Row]], list[str]]
    decorated: list[str]  # held-out answers of evaluate(): the adapter attached
    undecorated: list[str]  # held-out answers of evaluate.__wrapped__(): the base model


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300, help="pretraining steps of the base model")
    parser.add_argument("--prefix-steps", type=int, default=100, help="training steps of the prefix")
    parser.add_argument("--virtual-tokens", type=int, default=10, help="prefix length")
    parser.add_argument(
        "--adapter-folder",
        type=Path,
        default=None,
        help="where to save the trained prefix (default: a temporary folder)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="decorator_eval_"))
    adapter_folder: Path = args.adapter_folder or work / "complaint-prefix"

    encoder = Encoder(build_tokenizer(work / "tokenizer"))
    model = build_base_model(encoder, args.base_steps, args.seed)
    train_rows, held_out = complaint_split()
    train_and_save_prefix(model, encoder, train_rows, adapter_folder, args.prefix_steps, args.virtual_tokens, args.seed)

    # --- the existing evaluation script: unchanged but for the decorator line ---------------
    @attach_prefix(model, adapter_folder)  # added
    def evaluate(model: LlamaForCausalLM, rows: list[Row]) -> list[str]:
        """Greedy answers of ``model`` to ``<text> answer :`` for each row."""
        return generate_answers(model, encoder, rows, None)

    decorated = evaluate(model, held_out)
    print(
        f"\nevaluate():              {decorated[:4]} ...  accuracy {accuracy(decorated, held_out):.0%} "
        "(majority baseline 50%)"
    )
    undecorated = evaluate.__wrapped__(model, held_out)  # type: ignore[attr-defined]  # wrapt keeps it
    print(f"evaluate.__wrapped__():  {undecorated[:4]} ...  label words {label_word_rate(undecorated):.0%}")
    return Result(model, encoder, adapter_folder, held_out, evaluate, decorated, undecorated)


if __name__ == "__main__":
    main()
