"""``transformers.pipeline`` on an attached model, for prefix tuning, LoRA, prompt tuning and IA3.

* ``text-classification`` on an attached sequence-classification model (tiny llama for every method, bert for
  prefix tuning) gives the softmax of the model's own logits inside the block, and the base model's after;
* ``text-generation`` with LoRA, prompt tuning and IA3 (prefix tuning: tests/integration/test_pipelines.py) equals
  ``model.generate`` inside the block and the base model's generation after.

Oracles: the same model called directly (the pipeline adds only tokenization and a softmax / decoding),
and the base model before attaching.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from shared_fixtures import char_tokenizer
from test_integration_trainer import METHODS
from test_pipelines import GENERATE_KWARGS, MAX_NEW_TOKENS, generate
from test_pipelines import tiny_model as tiny_causal_lm
from tiny_encoders import build_head
from tiny_models import FAMILY_CONFIGS, VOCAB
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from prefix_hooks.core.attachment import Attachment

NUM_LABELS = 3
TEXT = "attached!"
CHARACTERS = VOCAB - 4  # token ids 3..VOCAB-2
CLASSIFIERS = [("llama", method) for method in ("prefix", "lora", "prompt", "ia3")] + [("bert", "prefix")]


def classifier(family: str) -> PreTrainedModel:
    """A tiny sequence classifier (``NUM_LABELS`` classes), eval, float32, a larger init so adapters matter."""
    if family == "bert":
        return build_head("bert", "sequence", initializer_range=0.2)
    config = AutoConfig.for_model(family, **FAMILY_CONFIGS[family], num_labels=NUM_LABELS, initializer_range=0.2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def randomised(model: nn.Module, method: str, seed: int = 3, scale: float = 0.5) -> Attachment:
    """A (not attached) adapter of ``method`` moved off its no-op initial values by ``scale`` * N(0, 1)."""
    handle = METHODS[method](model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return handle


def scores(result: Any) -> torch.Tensor:
    """The pipeline's ``[{"label": "LABEL_i", "score": s}, ...]`` (any order; or that list in a list of one
    text's results) as a ``(NUM_LABELS,)`` tensor."""
    if isinstance(result[0], list):
        (result,) = result
    by_label = {entry["label"]: entry["score"] for entry in result}
    return torch.tensor([by_label[f"LABEL_{i}"] for i in range(len(by_label))])


@pytest.mark.parametrize(("family", "method"), CLASSIFIERS)
def test_text_classification_pipeline_uses_the_adapter_inside_the_block_only(family: str, method: str) -> None:
    tokenizer = char_tokenizer(CHARACTERS)
    model = classifier(family)
    classify = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    inputs = dict(tokenizer(TEXT, return_tensors="pt"))
    assert inputs["input_ids"].shape == (1, len(TEXT))
    with torch.no_grad():
        base_direct = model(**inputs).logits[0].softmax(-1)  # (NUM_LABELS,)
    base = scores(classify(TEXT))
    with randomised(model, method):
        inside = scores(classify(TEXT))
        with torch.no_grad():
            direct = model(**inputs).logits[0].softmax(-1)
    after = scores(classify(TEXT))

    assert inside.shape == (NUM_LABELS,)
    torch.testing.assert_close(inside, direct, rtol=0, atol=1e-5)
    torch.testing.assert_close(base, base_direct, rtol=0, atol=1e-5)
    assert (inside - base).abs().max() > 1e-3, "the pipeline ignored the adapter"
    assert torch.equal(after, base)


@pytest.mark.parametrize("method", ["lora", "prompt", "ia3"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_generation_pipeline_matches_generate_inside_the_block(family: str, method: str) -> None:
    tokenizer = char_tokenizer(CHARACTERS)
    model = tiny_causal_lm(family)
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    inputs = dict(tokenizer(TEXT, return_tensors="pt"))
    base_text = generator(TEXT, **GENERATE_KWARGS)[0]["generated_text"]
    with randomised(model, method):
        text = generator(TEXT, **GENERATE_KWARGS)[0]["generated_text"]
        direct = generate(model, inputs)
    after_text = generator(TEXT, **GENERATE_KWARGS)[0]["generated_text"]

    expected = tokenizer.decode(direct[0], skip_special_tokens=True)
    assert len(expected) == len(TEXT) + MAX_NEW_TOKENS
    assert text == expected
    assert text != base_text, "the pipeline ignored the adapter"
    assert after_text == base_text


# Not ("llama", "prompt"): a decoder classifier pools the last non-pad token, found from ``input_ids``; prompt
# tuning hands the model ``inputs_embeds`` instead, so a right-padded row would pool a pad position (PEFT 0.21.2
# does: logits off by 2.9 on this model). We refuse such a batch instead: see the test after this one.
PADDED_CLASSIFIERS = [case for case in CLASSIFIERS if case != ("llama", "prompt")] + [("bert", "prompt")]


@pytest.mark.parametrize(("family", "method"), PADDED_CLASSIFIERS)
def test_batched_text_classification_pipeline_equals_one_text_at_a_time(family: str, method: str) -> None:
    """Right-padded batches: each row scores as it does alone."""
    tokenizer = char_tokenizer(CHARACTERS)
    model = classifier(family)
    classify = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    texts = ["abc", "a longer text!"]
    with randomised(model, method):
        batched = [scores(result) for result in classify(texts, batch_size=2)]
        alone = [scores(classify(text)) for text in texts]
    for row, (ours, single) in enumerate(zip(batched, alone, strict=True)):
        torch.testing.assert_close(ours, single, rtol=0, atol=1e-5, msg=f"row {row}")
    assert (alone[0] - alone[1]).abs().max() > 1e-4  # the rows are told apart


def test_prompt_on_a_decoder_classifier_refuses_right_padded_rows() -> None:
    """The right-padded batch raises, naming the rows, before the model runs; left padding (the last column
    real in every row) and unpadded rows classify as before."""
    tokenizer = char_tokenizer(CHARACTERS)
    model = classifier("llama")
    classify = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    texts = ["abc", "a longer text!"]
    with randomised(model, "prompt"):
        with pytest.raises(ValueError, match=r"rows \[0\] of the batch are right-padded"):
            classify(texts, batch_size=2)
        alone = [scores(classify(text)) for text in texts]
        tokenizer.padding_side = "left"
        left = [scores(result) for result in classify(texts, batch_size=2)]
    torch.testing.assert_close(left[1], alone[1], rtol=0, atol=1e-5)  # the longest row has no padding
    assert (alone[0] - alone[1]).abs().max() > 1e-4
