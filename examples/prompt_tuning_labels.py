"""Prompt tuning with TEXT init: a trained prompt makes ``generate()`` answer with new label words.

The base model never sees the complaint task. A new labelling task is taught by training only a
soft prompt, initialised from the task's instruction text, and the prompt generalises to
messages it was not trained on.

1. A word-level tokenizer is built from the example's data (``examples/data/``) and saved to a
   folder, as a tokenizer from the hub would be. A small Llama (hidden 64, 2 layers) is built
   from a config and pretrained on *other* tasks: four ways of labelling the 200 reviews of
   ``sentiment.tsv`` ("is this review positive or negative :" -> positive / negative, "rate this
   review :" -> good / bad, "how does the writer feel :" -> sad / happy, "what kind of review is
   this :" -> complaint / praise), repeating a review's last word, and naming opposites
   ("what is the opposite of yes" -> no). So it knows the words ``complaint`` and ``no`` as
   answers, but it never sees the complaint instruction, a customer message, nor the answer
   ``no complaint``.
2. ``examples/data/complaints.tsv`` (96 customer messages, half of them complaints) is split:
   every fourth message of each label is held out (24), the rest (72) train.
3. ``attach_prompt(model, PromptTuningConfig(prompt_tuning_init="TEXT",
   prompt_tuning_init_text=INSTRUCTION, ...))``: the prompt starts as the model's own embeddings
   of "classify if the text is a complaint or not :" and only the prompt is trained, on the
   train split, to answer ``complaint`` / ``no complaint``. Inside the block the unchanged
   ``model.generate()`` answers the held-out messages with the label words, far above the
   majority-class baseline (50%).
4. Outside the block, the base model given the same instruction as text never answers with a
   label word, and its answers are exactly those from before the block.

Pure prompt tuning on so small a model is sensitive to the seed: held-out accuracy was 75%
(seed 2, the default), 58% (seed 0) and 54% (seed 1) with the default steps; the base model's own
"what kind of review" answers, read as complaint labels, score about 75% on these messages, the
ceiling of what a prompt can reuse.

Runs in about 20 seconds on 2 CPU cores: ``python examples/prompt_tuning_labels.py``
(``--help`` for the options). No network access is needed.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefix_hooks import PromptTuningConfig, attach_prompt

try:
    from tqdm.auto import trange
except ImportError:  # tqdm is optional: fall back to a plain range
    trange = range

DATA = Path(__file__).parent / "data"
INSTRUCTION = "classify if the text is a complaint or not :"
LABELS = ("complaint", "no complaint")
SENTIMENT_TASKS = {  # base tasks: instruction -> (answer to a negative review, answer to a positive one)
    "is this review positive or negative :": ("negative", "positive"),
    "rate this review :": ("bad", "good"),
    "how does the writer feel :": ("sad", "happy"),
    "what kind of review is this :": ("complaint", "praise"),
}
ECHO_INSTRUCTION = "repeat the last word :"
OPPOSITE_INSTRUCTION = "what is the opposite of"
OPPOSITES = (  # the third base task; "complaint" and "no" are answers here, in another sense
    ("good", "bad"),
    ("happy", "sad"),
    ("early", "late"),
    ("hot", "cold"),
    ("clean", "dirty"),
    ("fast", "slow"),
    ("kind", "rude"),
    ("fresh", "stale"),
    ("quiet", "loud"),
    ("cheap", "expensive"),
    ("soft", "hard"),
    ("love", "hate"),
    ("best", "worst"),
    ("open", "closed"),
    ("always", "never"),
    ("found", "lost"),
    ("yes", "no"),
    ("praise", "complaint"),
    ("thanks", "sorry"),
    ("sweet", "bitter"),
    ("bright", "dark"),
    ("win", "lose"),
    ("easy", "difficult"),
    ("warm", "cool"),
    ("strong", "weak"),
    ("full", "empty"),
)
ANSWER = "answer :"
HELD_OUT_EVERY = 4  # every fourth message of each label is held out
SPECIAL = ("[PAD]", "[UNK]", "[EOS]")

Row = tuple[str, str]  # (text, answer words)
Example = tuple[list[int], list[int]]  # (prompt ids, answer ids ending with [EOS])


def read_tsv(name: str) -> list[tuple[str, str]]:
    """Non-comment lines of ``examples/data/<name>`` split at the tab."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def complaint_split() -> tuple[list[Row], list[Row]]:
    """``(train, held_out)`` (text, label) rows of ``complaints.tsv``; each label split alike."""
    train: list[Row] = []
    held_out: list[Row] = []
    for label in LABELS:
        rows = [row for row in read_tsv("complaints.tsv") if row[1] == label]
        for index, row in enumerate(rows):
            (held_out if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(row)
    return train, held_out


def review_rows() -> list[Row]:
    """(review, positive/negative) rows of ``sentiment.tsv``, lower-cased, without final punctuation."""
    return [(sentence.lower().rstrip(".!?"), label) for label, sentence in read_tsv("sentiment.tsv")]


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over every word of the example data, saved to ``folder``."""
    texts = [text for text, _ in review_rows() + read_tsv("complaints.tsv")]
    texts += [INSTRUCTION, *SENTIMENT_TASKS, ECHO_INSTRUCTION, OPPOSITE_INSTRUCTION, ANSWER, *LABELS]
    texts += [f"{a} {b}" for a, b in (*SENTIMENT_TASKS.values(), *OPPOSITES)]
    splitter = pre_tokenizers.WhitespaceSplit()
    words = sorted({word for text in texts for word, _ in splitter.pre_tokenize_str(text.lower())})
    vocab = {token: index for index, token in enumerate([*SPECIAL, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


class Encoder:
    """Token ids of ``<instruction> <text> answer :`` and of ``<answer words> [EOS]``."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def query(self, text: str, instruction: str | None) -> list[int]:
        """What ``generate()`` is given; ``instruction=None`` leaves it to a soft prompt."""
        return self.ids(f"{instruction or ''} {text} {ANSWER}")

    def example(self, text: str, answer: str, instruction: str | None) -> Example:
        return self.query(text, instruction), self.ids(answer) + [self.tokenizer.eos_token_id]

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (B, T); ``labels`` (B, T), -100 but on the answer."""
        width = max(len(query) + len(answer) for query, answer in examples)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_token_id)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T), 1 = real token
        labels = torch.full_like(input_ids, -100)  # (B, T)
        for row, (query, answer) in enumerate(examples):
            sequence = torch.tensor(query + answer)
            input_ids[row, : len(sequence)] = sequence
            attention_mask[row, : len(sequence)] = 1
            labels[row, len(query) : len(sequence)] = sequence[len(query) :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(encoder: Encoder, examples: list[Example], size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    return [encoder.batch(shuffled[start : start + size]) for start in range(0, len(shuffled), size)]


def train(
    model: LlamaForCausalLM,
    parameters: list[torch.nn.Parameter],
    data: list[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    desc: str,
) -> list[float]:
    """``steps`` AdamW steps over ``data`` (cycled); the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    progress = trange(steps, desc=desc, mininterval=1.0)
    for step in progress:
        loss = model(**data[step % len(data)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 and hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def generate_answers(model: LlamaForCausalLM, encoder: Encoder, rows: list[Row], instruction: str | None) -> list[str]:
    """Greedy answers of the model's own ``generate()`` to each ``<instruction> <text> answer :``."""
    answers = []
    generate = cast(Any, model).generate  # transformers' GenerationMixin self type confuses mypy
    for text, _ in rows:
        query = torch.tensor([encoder.query(text, instruction)])  # (1, T)
        generated = generate(
            query,
            attention_mask=torch.ones_like(query),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=encoder.tokenizer.pad_token_id,
            eos_token_id=encoder.tokenizer.eos_token_id,
        )  # (1, T + new)
        answers.append(str(encoder.tokenizer.decode(generated[0, query.shape[1] :], skip_special_tokens=True)))
    return answers


def accuracy(answers: list[str], rows: list[Row]) -> float:
    return sum(answer == label for answer, (_, label) in zip(answers, rows, strict=True)) / len(rows)


def label_word_rate(answers: list[str]) -> float:
    """Share of answers that are a label (``complaint`` or ``no complaint``)."""
    return sum(answer in LABELS for answer in answers) / len(answers)


def pretraining_examples(encoder: Encoder) -> list[Example]:
    """The base model's tasks over the reviews and word pairs; never a complaint message, nor the instruction."""
    reviews = review_rows()
    examples = [
        encoder.example(text, words[label == "positive"], instruction)
        for instruction, words in SENTIMENT_TASKS.items()
        for text, label in reviews
    ]
    examples += [encoder.example(text, text.split()[-1], ECHO_INSTRUCTION) for text, _ in reviews]
    pairs = OPPOSITES + tuple((b, a) for a, b in OPPOSITES)
    return examples + [encoder.example(a, b, OPPOSITE_INSTRUCTION) for a, b in pairs for _ in range(3)]


def build_base_model(encoder: Encoder, steps: int, seed: int) -> LlamaForCausalLM:
    """A small Llama built from a config and pretrained for ``steps`` on :func:`pretraining_examples`."""
    torch.manual_seed(seed)
    tokenizer = encoder.tokenizer
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    train(
        model,
        list(model.parameters()),
        batches(encoder, pretraining_examples(encoder), 32, seed),
        steps,
        lr=3e-3,
        desc="base model, other tasks",
    )
    return model


@dataclass
class Result:
    """What the example measured (its test asserts on it)."""

    train: list[Row]
    held_out: list[Row]
    base_sentiment_accuracy: float  # the base model on its own pretraining task
    before: list[str]  # held-out answers of the base model to the instruction as text
    at_init: list[str]  # held-out answers inside the block, prompt untrained (TEXT init)
    inside: list[str]  # held-out answers inside the block, prompt trained
    inside_train: list[str]  # train-split answers inside the block, prompt trained
    after: list[str]  # held-out answers after the block (instruction as text)
    prompt_losses: list[float]


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=600, help="pretraining steps of the base model")
    parser.add_argument("--prompt-steps", type=int, default=300, help="training steps of the prompt")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="prompt length (TEXT init repeats the text)")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tokenizer_folder:
        tokenizer = build_tokenizer(Path(tokenizer_folder))
        encoder = Encoder(tokenizer)
        model = build_base_model(encoder, args.base_steps, args.seed)
        reviews = review_rows()
        first = next(iter(SENTIMENT_TASKS))  # the positive / negative task
        base_sentiment = accuracy(generate_answers(model, encoder, reviews[::5], first), reviews[::5])
        print(f"\nbase model on its own sentiment task: {base_sentiment:.0%}")

        # 2. the complaint task, new to the model
        train_rows, held_out = complaint_split()
        before = generate_answers(model, encoder, held_out, INSTRUCTION)
        print(f"base model after the instruction: {before[:4]} ...  label words: {label_word_rate(before):.0%}")

        # 3. prompt tuning: only the prompt trains, from the instruction's embeddings
        config = PromptTuningConfig(
            num_virtual_tokens=args.virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=INSTRUCTION,
            tokenizer_name_or_path=tokenizer_folder,
        )
        with attach_prompt(model, config) as handle:
            handle.print_trainable_parameters()
            at_init = generate_answers(model, encoder, held_out, None)
            print(f"TEXT init, untrained: held-out accuracy {accuracy(at_init, held_out):.0%}")
            examples = [encoder.example(text, label, None) for text, label in train_rows]
            losses = train(
                model,
                list(handle.parameters()),
                batches(encoder, examples, 24, args.seed),
                args.prompt_steps,
                lr=1e-1,
                desc="prompt only, complaint labels",
            )
            if losses:
                print(f"prompt loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
            inside = generate_answers(model, encoder, held_out, None)
            inside_train = generate_answers(model, encoder, train_rows, None)
            print(
                f"inside the block: {inside[:4]} ...  held-out accuracy {accuracy(inside, held_out):.0%} "
                f"(majority baseline 50%), train accuracy {accuracy(inside_train, train_rows):.0%}"
            )

    # 4. outside the block: the base model again
    after = generate_answers(model, encoder, held_out, INSTRUCTION)
    print(f"after the block:  {after[:4]} ...  label words: {label_word_rate(after):.0%}")
    if after != before:
        raise SystemExit("generation after the block differs from before it")
    return Result(train_rows, held_out, base_sentiment, before, at_init, inside, inside_train, after, losses)


if __name__ == "__main__":
    main()
