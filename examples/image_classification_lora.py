"""Image classification with LoRA on a small ViT and the unchanged Hugging Face Trainer.

There is no pretrained ViT offline, so the example makes its own "pretrained checkpoint"
first, on a different task, and then adapts it the way one adapts a hub checkpoint:

0. Data: scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes),
   upsampled x4 to 32x32. Every fifth image is held out for testing (359), the rest train (1438).
1. "Pretraining": a ViT (32x32 images, 8x8 patches, hidden 64, 3 layers) is fully fine-tuned
   from random weights on the digits 0-4 only, as a 5-way classifier, and saved with
   ``save_pretrained``. Its backbone has never seen a 5, 6, 7, 8 or 9.
2. The checkpoint is loaded as a 10-way classifier (``num_labels=10, ignore_mismatched_sizes=True``:
   a new, randomly initialised head), as with any hub checkpoint. Accuracy on all 10 digits: about chance.
3. ``attach_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
   modules_to_save=["classifier"]))``: inside the block, ``Trainer(model, ...).train()`` trains
   only the LoRA factors and a copy of the head, on all 10 digits. Trainable parameters are
   printed before and after attaching (PEFT's wording); accuracy after training.
4. ``handle.save(folder)``; on leaving the block the model is exactly the model from step 2.
5. The checkpoint loaded again with a different random head, plus ``attach(model, folder)``,
   reproduces the trained logits exactly.
6. For comparison, without prefix_hooks: a copy of the model from step 2 with everything frozen
   but its head, trained with the same Trainer settings (a linear probe of the checkpoint).

``["query", "value"]`` are the names of ViT's query and value projections in transformers 4
and in most tutorials; transformers 5 renamed them ``q_proj`` / ``v_proj``. prefix_hooks
matches a renamed module by either name (PEFT 0.21 finds no module for the old names), and the
saved config names the selected modules in full, so PEFT loads the folder too.

Runs in a few minutes on 2 CPU cores: ``python examples/image_classification_lora.py``
(``--quick`` for a short run; ``--help`` for the options). No network access is needed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: the checkpoint is made here

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from prefix_hooks import LoraConfig, attach, attach_lora

try:
    import tqdm  # noqa: F401  (Trainer draws its progress bar with tqdm when it is installed)

    HAVE_TQDM = True
except ImportError:  # tqdm is optional
    HAVE_TQDM = False

TEST_EVERY = 5  # every fifth image is held out
UPSAMPLE = 4  # 8x8 digits -> 32x32 images
PRETRAIN_CLASSES = 5  # the "pretraining" task: digits 0-4 only
NUM_CLASSES = 10


@dataclass(frozen=True)
class Result:
    """What the example measured (the test asserts on it). Accuracies are on the held-out test split."""

    pretrain_accuracy: float  # the 5-way pretrained model on the test digits 0-4
    accuracy_before: float  # checkpoint + new random 10-way head, all 10 digits
    accuracy_after: float  # inside the block, after LoRA training
    accuracy_after_unseen: float  # the same, on the digits 5-9 only (never seen in pretraining)
    accuracy_head_only: float  # baseline: only the head trained (no LoRA), same steps and learning rate
    accuracy_outside: float  # after the block: the model from step 2 again
    accuracy_reloaded: float  # checkpoint with another random head + the saved adapter
    reload_max_diff: float  # max |logits reloaded - logits trained| on the test set
    logits_restored: bool  # logits after the block are bit-identical to those before
    model_restored: bool  # after the block: the same module objects, parameters, values and requires_grad flags
    base_trainable: tuple[int, int]  # (trainable, all) of the model before attaching
    adapter_trainable: tuple[int, int]  # handle.get_nb_trainable_parameters() inside the block
    model_trainable: tuple[int, int]  # (trainable, all) of model.parameters() inside the block: what Trainer sees
    train_losses: tuple[float, ...]  # Trainer's logged losses of the LoRA training


@dataclass(frozen=True)
class Digits:
    """Images (N, 1, 32, 32), normalised to [-1, 1], and labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def where(self, keep: torch.Tensor) -> Digits:
        return Digits(self.images[keep], self.labels[keep])

    def __len__(self) -> int:
        return len(self.labels)


def load_splits() -> tuple[Digits, Digits]:
    """(train, test): scikit-learn's digits upsampled x4; every fifth image is a test image."""
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    images = F.interpolate(pixels / 16.0, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)  # (N, 1, 32, 32)
    images = (images - 0.5) / 0.5  # [-1, 1], as ViT image processors normalise
    labels = torch.tensor(digits.target, dtype=torch.long)  # (N,)
    is_test = torch.arange(len(labels)) % TEST_EVERY == TEST_EVERY - 1
    return Digits(images[~is_test], labels[~is_test]), Digits(images[is_test], labels[is_test])


class ImageDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``{"pixel_values": (1, 32, 32), "labels": ()}`` items; Trainer's default collator stacks them."""

    def __init__(self, digits: Digits) -> None:
        self.digits = digits

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.digits.images[index], "labels": self.digits.labels[index]}


def vit_config(num_labels: int) -> ViTConfig:
    """A small ViT: 32x32 single-channel images, 8x8 patches (16 patches + CLS = 17 tokens)."""
    config = ViTConfig(
        image_size=8 * UPSAMPLE, patch_size=8, num_channels=1, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config.num_labels = num_labels
    return config


def load_checkpoint(folder: Path, seed: int) -> ViTForImageClassification:
    """The pretrained checkpoint as a 10-way classifier whose new head is initialised from ``seed``."""
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report only says that the head was re-initialised: expected
    try:
        model = ViTForImageClassification.from_pretrained(folder, num_labels=NUM_CLASSES, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, digits: Digits, batch_size: int = 120) -> torch.Tensor:
    """Logits (N, num_labels) in eval mode."""
    model.eval()
    out = [model(pixel_values=digits.images[start : start + batch_size]).logits  # (B, num_labels)
           for start in range(0, len(digits), batch_size)]
    return torch.cat(out)


def accuracy(logits: torch.Tensor, digits: Digits) -> float:
    return (logits.argmax(-1) == digits.labels).float().mean().item()


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` parameter elements of a plain model."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


Fingerprint = tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int, bool], ...], list[torch.Tensor]]


def model_fingerprint(model: nn.Module) -> Fingerprint:
    """The module objects by name; each parameter's name, identity and ``requires_grad``; copies of the values."""
    modules = tuple((name, id(module)) for name, module in model.named_modules())
    parameters = tuple((name, id(p), p.requires_grad) for name, p in model.named_parameters())
    return modules, parameters, [p.detach().clone() for p in model.parameters()]


def same_fingerprint(a: Fingerprint, b: Fingerprint) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


def print_counts(counts: tuple[int, int]) -> None:
    """PEFT's wording, as ``handle.print_trainable_parameters()`` prints it."""
    trainable, total = counts
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def train(model: nn.Module, data: Digits, args: argparse.Namespace, steps: int, lr: float, folder: Path) -> tuple[float, ...]:
    """``Trainer(model, ...).train()`` for ``steps`` steps; the logged losses."""
    training = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
        warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 6), save_strategy="no", report_to=[],
        use_cpu=True, seed=args.seed, dataloader_num_workers=0, disable_tqdm=args.no_progress or not HAVE_TQDM,
    )
    trainer = Trainer(model=model, args=training, train_dataset=ImageDataset(data))
    trainer.train()
    return tuple(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)


def pretrain(train_split: Digits, test_split: Digits, args: argparse.Namespace, folder: Path) -> float:
    """Fully fine-tune a random ViT on the digits 0-4 and save it to ``folder``; its test accuracy on 0-4."""
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(vit_config(PRETRAIN_CLASSES))
    seen = train_split.where(train_split.labels < PRETRAIN_CLASSES)
    losses = train(model, seen, args, args.pretrain_steps, args.pretrain_lr, folder / "pretrain_trainer")
    model.save_pretrained(folder / "checkpoint")
    seen_test = test_split.where(test_split.labels < PRETRAIN_CLASSES)
    result = accuracy(predict(model, seen_test), seen_test)
    print(f"pretrained a ViT on the digits 0-4 ({len(seen)} images): test accuracy on 0-4 {result:.3f}  (loss "
          + " -> ".join(f"{loss:.3f}" for loss in losses) + ")")
    return result


def head_only_baseline(checkpoint: Path, train_split: Digits, test_split: Digits, args: argparse.Namespace) -> float:
    """Test accuracy of the checkpoint with only its new head trained (plain transformers, no adapter)."""
    model = load_checkpoint(checkpoint, args.seed)  # the same head initialisation as the LoRA run
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    train(model, train_split, args, args.steps, args.lr, checkpoint.parent / "head_only_trainer")
    return accuracy(predict(model, test_split), test_split)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pretrain-steps", type=int, default=600, help="full fine-tuning steps on 0-4 (default 600)")
    parser.add_argument("--steps", type=int, default=400, help="LoRA Trainer steps on all digits (default 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="learning rate for the LoRA factors and the head copy (and the head-only baseline)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2 r)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the checkpoint and the adapter are saved (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a short run (200 + 120 steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps = 200, 120
    if min(args.pretrain_steps, args.steps, args.batch_size, args.rank) < 1:
        parser.error(f"--pretrain-steps, --steps, --batch-size and --rank must be >= 1, got "
                     f"{args.pretrain_steps}, {args.steps}, {args.batch_size}, {args.rank}")
    return args


def run(args: argparse.Namespace, output_dir: Path) -> Result:
    train_split, test_split = load_splits()
    print(f"digits: {len(train_split)} training images, {len(test_split)} test images, 32x32")
    pretrain_accuracy = pretrain(train_split, test_split, args, output_dir)

    model = load_checkpoint(output_dir / "checkpoint", args.seed)
    before = predict(model, test_split)
    print(f"accuracy before (checkpoint, new random 10-way head): {accuracy(before, test_split):.3f}")
    base_counts = trainable_counts(model)
    fingerprint = model_fingerprint(model)
    print("before attaching, the model: ", end="")
    print_counts(base_counts)

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    handle = attach_lora(model, config)
    with handle:  # the model now carries LoRA; everything below is ordinary Trainer code
        print("after attaching, the model:  ", end="")
        handle.print_trainable_parameters()
        adapter_counts = handle.get_nb_trainable_parameters()
        model_counts = trainable_counts(model)
        losses = train(model, train_split, args, args.steps, args.lr, output_dir / "trainer")
        trained = predict(model, test_split)
        unseen = test_split.labels >= PRETRAIN_CLASSES
        after_unseen = (trained[unseen].argmax(-1) == test_split.labels[unseen]).float().mean().item()
        print(f"accuracy after LoRA training: {accuracy(trained, test_split):.3f} (digits 5-9 alone: "
              f"{after_unseen:.3f})  (loss " + " -> ".join(f"{loss:.3f}" for loss in losses) + ")")
        handle.save(output_dir / "adapter")
        print(f"adapter saved to {output_dir / 'adapter'}: {sorted(p.name for p in (output_dir / 'adapter').iterdir())}")

    outside = predict(model, test_split)
    restored = torch.equal(outside, before)
    model_restored = same_fingerprint(model_fingerprint(model), fingerprint)
    print(f"after the block: accuracy {accuracy(outside, test_split):.3f}, logits identical to before: {restored}, "
          f"same modules and parameters: {model_restored}")

    fresh = load_checkpoint(output_dir / "checkpoint", args.seed + 1)  # another random head: the trained one is saved
    with attach(fresh, output_dir / "adapter"):
        reloaded = predict(fresh, test_split)
    max_diff = (reloaded - trained).abs().max().item()
    print(f"reloaded on a fresh copy of the checkpoint: accuracy {accuracy(reloaded, test_split):.3f}, "
          f"max |logit difference| {max_diff:.2e}")
    head_only = head_only_baseline(output_dir / "checkpoint", train_split, test_split, args)
    print(f"baseline, the head alone trained (no LoRA, same steps): accuracy {head_only:.3f}")
    return Result(
        pretrain_accuracy=pretrain_accuracy, accuracy_before=accuracy(before, test_split),
        accuracy_after=accuracy(trained, test_split), accuracy_after_unseen=after_unseen,
        accuracy_head_only=head_only,
        accuracy_outside=accuracy(outside, test_split), accuracy_reloaded=accuracy(reloaded, test_split),
        reload_max_diff=max_diff, logits_restored=restored, model_restored=model_restored,
        base_trainable=base_counts,
        adapter_trainable=adapter_counts, model_trainable=model_counts, train_losses=losses,
    )


def main(argv: Sequence[str] | None = None) -> Result:
    """Run the example; ``argv`` as on the command line (``None``: ``sys.argv``)."""
    args = parse_args(argv)
    bars = hf_logging.is_progress_bar_enabled()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # transformers' own bars (saving and loading the checkpoint)
    try:
        if args.output_dir is not None:
            return run(args, args.output_dir)
        with tempfile.TemporaryDirectory() as folder:
            return run(args, Path(folder))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    result = main()
    if not result.logits_restored or result.reload_max_diff > 1e-5:
        raise SystemExit("the model was not restored, or the reloaded adapter did not reproduce the logits")
