"""Quickstart: steer a small decoder with a trained prefix, then get the exact model back.

1. Build a tiny Llama and train it on two tasks at once from `examples/data/en_fr.tsv`:
   "cat>chat." (translate to French) and "cat>tac." (reverse the word). Greedy
   decoding then mixes the two.
2. Attach a 8-token prefix and train only the prefix on the translation task.
   Inside the block, the unchanged `model.generate()` answers in French.
3. Leave the block: the model is bit-for-bit the model from step 1.

Runs in well under two minutes on 2 CPU cores: `python examples/quickstart.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_hooks import PrefixTuningConfig, attach_prefix

try:
    from tqdm.auto import trange
except ImportError:  # tqdm is optional: fall back to a plain range
    trange = range

DATA = Path(__file__).parent / "data" / "en_fr.tsv"
PAD, BOS, EOS = 0, 1, 2
BASE_STEPS = 300
PREFIX_STEPS = 150
NUM_VIRTUAL_TOKENS = 8


class CharVocab:
    """Characters <-> ids, after the three special ids."""

    def __init__(self, text: str) -> None:
        self.ids = {char: index + 3 for index, char in enumerate(sorted(set(text)))}
        self.chars = {index: char for char, index in self.ids.items()}

    def __len__(self) -> int:
        return len(self.ids) + 3

    def encode(self, text: str) -> list[int]:
        return [BOS] + [self.ids[char] for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars.get(index, "") for index in ids)


def load_pairs() -> list[tuple[str, str]]:
    lines = DATA.read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def make_batch(examples: list[tuple[str, str]], vocab: CharVocab) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (B, T) and labels on the answer only."""
    sequences = [vocab.encode(f"{question}>{answer}.") + [EOS] for question, answer in examples]
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), PAD)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (sequence, (question, _)) in enumerate(zip(sequences, examples)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        answer_start = len(question) + 2  # BOS + question + ">"
        labels[row, answer_start : len(sequence)] = input_ids[row, answer_start : len(sequence)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(model: torch.nn.Module, parameters: list[torch.nn.Parameter], batch: dict[str, torch.Tensor],
          steps: int, lr: float, desc: str) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model.train()
    losses = []
    progress = trange(steps, desc=desc, mininterval=0.5)
    for step in progress:
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 and hasattr(progress, "set_postfix"):
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def answers(model: Any, pairs: list[tuple[str, str]], vocab: CharVocab) -> list[str]:
    """Greedy answers to "word>" for every pair, with the model's own generate()."""
    out = []
    for question, answer in pairs:
        prompt = torch.tensor([vocab.encode(question + ">")])  # (1, T)
        generated = model.generate(
            prompt, max_new_tokens=len(answer) + 2, do_sample=False, pad_token_id=PAD, eos_token_id=vocab.ids["."]
        )
        out.append(vocab.decode(generated[0, prompt.shape[1] :].tolist()).rstrip("."))
    return out


def fingerprint(model: torch.nn.Module) -> str:
    """Hash of every tensor in the state dict, plus the module tree and hook counts."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        hooks = len(module._forward_pre_hooks) + len(module._forward_hooks)
        digest.update(f"{name}:{type(module).__name__}:{hooks}".encode())
    return digest.hexdigest()[:16]


def accuracy(got: list[str], pairs: list[tuple[str, str]]) -> str:
    return f"{sum(g == answer for g, (_, answer) in zip(got, pairs))}/{len(pairs)}"


def main() -> None:
    torch.manual_seed(0)
    pairs = load_pairs()
    vocab = CharVocab("".join(question + answer for question, answer in pairs) + ">.")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)

    both_tasks = make_batch(pairs + [(question, question[::-1]) for question, _ in pairs], vocab)
    train(model, list(model.parameters()), both_tasks, BASE_STEPS, lr=3e-3, desc="base model, two tasks")
    before = answers(model, pairs, vocab)
    print(f"\nbefore the prefix: {before}  (French: {accuracy(before, pairs)})")
    base_print = fingerprint(model)

    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=True))
    with handle:
        handle.print_trainable_parameters()
        losses = train(model, list(handle.parameters()), make_batch(pairs, vocab), PREFIX_STEPS, lr=3e-3,
                       desc="prefix only, translation")
        steps = [0, PREFIX_STEPS // 4, PREFIX_STEPS // 2, PREFIX_STEPS - 1]
        print("prefix loss: " + " -> ".join(f"{losses[i]:.3f} (step {i})" for i in steps))
        inside = answers(model, pairs, vocab)
        print(f"inside the block:  {inside}  (French: {accuracy(inside, pairs)})")

    after = answers(model, pairs, vocab)
    print(f"after the block:   {after}  (French: {accuracy(after, pairs)})")
    restored = fingerprint(model) == base_print
    print(f"model restored bit-exactly: {restored} (fingerprint {fingerprint(model)})")
    if not restored or after != before:
        raise SystemExit("the model was not restored")


if __name__ == "__main__":
    main()
