"""Small helpers several test modules share: loading an example script as a module, a
character-level tokenizer for pipelines, and a causal-LM dataset for Trainer tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from tiny_models import random_batch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def load_example(path: Path, name: str | None = None) -> ModuleType:
    """Import the script at ``path`` as a module named ``name`` (default: its file stem), registered in
    ``sys.modules`` (dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def char_tokenizer(characters: int) -> PreTrainedTokenizerFast:
    """One token per character, no special tokens added: ids 0-2 are ``<pad>``, ``<s>``, ``</s>``
    and ids ``3 .. 2 + characters`` are ``"!"`` and the ``characters - 1`` characters after it."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(ord("!") + i): i + 3 for i in range(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


class CausalRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``count`` causal-LM rows of ``length`` random tokens (labels = inputs), no padding."""

    def __init__(self, count: int, length: int, seed: int) -> None:
        batch = random_batch(count, length, seed=seed)
        self.rows = [
            {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]
