"""What prompt learning reads from the model: the token embedding and the config's dimensions
(``resolve_prompt_config``), on the tiny models of each kind."""

from __future__ import annotations

import pytest
from tiny_encoders import build_head
from tiny_models import build_model
from tiny_seq2seq import build as build_seq2seq

from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig
from prefix_hooks.prompt.resolve import resolve_prompt_config, token_embeddings

P = 4  # num_virtual_tokens
D = 32  # token_dim of the tiny models


def test_resolve_fills_dimensions_from_the_model_and_copies() -> None:
    model = build_model("gpt2")
    config = PromptEncoderConfig(num_virtual_tokens=P)
    resolved = resolve_prompt_config(config, model)
    assert isinstance(resolved, PromptEncoderConfig)
    assert resolved is not config and config.token_dim is None and config.encoder_hidden_size is None
    assert (resolved.token_dim, resolved.num_transformer_submodules) == (D, 1)
    assert (resolved.num_layers, resolved.num_attention_heads, resolved.encoder_hidden_size) == (2, 4, D)
    tuning = resolve_prompt_config(PromptTuningConfig(num_virtual_tokens=P, num_layers=7, num_attention_heads=3), model)
    assert (tuning.num_layers, tuning.num_attention_heads) == (7, 3)  # informational: the user's values stay
    wide = resolve_prompt_config(PromptEncoderConfig(encoder_hidden_size=12), model)
    assert isinstance(wide, PromptEncoderConfig) and wide.encoder_hidden_size == 12


def test_resolve_reads_the_input_embedding_width_not_hidden_size() -> None:
    electra = build_head("electra", "sequence")  # embeddings 16 wide, hidden 32
    assert electra.config.hidden_size == 32
    assert resolve_prompt_config(PromptTuningConfig(), electra).token_dim == 16


def test_resolve_uses_the_encoder_embedding_of_encoder_decoders() -> None:
    model = build_seq2seq("t5")
    resolved = resolve_prompt_config(PromptTuningConfig(num_transformer_submodules=2), model)
    assert token_embeddings(model) is model.get_encoder().get_input_embeddings()
    assert (resolved.token_dim, resolved.num_transformer_submodules) == (model.config.d_model, 2)


def test_resolve_rejects_bad_input() -> None:
    llama = build_model("llama")
    with pytest.raises(ValueError, match=r"token_dim=48 but the input embeddings of this llama model have width 32"):
        resolve_prompt_config(PromptTuningConfig(token_dim=48), llama)
    with pytest.raises(ValueError, match=r"num_transformer_submodules=2 applies to encoder-decoder models"):
        resolve_prompt_config(PromptEncoderConfig(num_transformer_submodules=2), llama)
    text = PromptTuningConfig(
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path="x",
        tokenizer_kwargs={"trust_remote_code": True},
    )
    with pytest.raises(ValueError, match=r"tokenizer_kwargs=\{'trust_remote_code': True\} is not accepted"):
        resolve_prompt_config(text, llama)
    with pytest.raises(TypeError, match=r"config=dict is not accepted"):
        resolve_prompt_config({"num_virtual_tokens": 3}, llama)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model_type='vit' has no token input embedding"):
        resolve_prompt_config(PromptTuningConfig(), build_head("vit", "image"))
