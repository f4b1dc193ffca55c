"""What prompt learning reads from the model: the token embedding the virtual tokens go in front of
(:func:`token_embeddings`), and the config's dimensions filled from it (:func:`resolve_prompt_config`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from prefix_hooks.prompt.config import PromptConfig, PromptEncoderConfig, PromptTuningConfig


def model_type(model: nn.Module) -> str:
    """``model.config.model_type`` (for messages), or the class name of a model without one."""
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def embedding_weight(module: object) -> torch.Tensor | None:
    """The ``(vocab, dim)`` weight of an ``nn.Embedding``-like lookup table (a module with a 2-D
    ``weight`` and an int ``embedding_dim``), else ``None``."""
    weight = getattr(module, "weight", None)
    if (
        isinstance(module, nn.Module)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(getattr(module, "embedding_dim", None), int)
    ):
        return weight
    return None


def token_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding the virtual tokens go in front of: ``(vocab, token_dim)`` lookup.

    For encoder-decoders it is the encoder's input embedding (the prompt goes in front of the
    encoder input); otherwise ``model.get_input_embeddings()``.

    Raises:
        ValueError: the model has no token input embedding (vision encoders, whisper's audio
            encoder); the message names the model type and what it found.
    """
    config = getattr(model, "config", None)
    found: object = None
    try:
        get_encoder = getattr(model, "get_encoder", None)
        if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
            found = get_encoder().get_input_embeddings()
        get_input_embeddings = getattr(model, "get_input_embeddings", None)
        if found is None and callable(get_input_embeddings):
            found = get_input_embeddings()
    except (NotImplementedError, AttributeError):
        found = None
    if embedding_weight(found) is None:
        what = "nothing" if found is None else type(found).__name__
        raise ValueError(
            f"model_type={model_type(model)!r} has no token input embedding (its input embedding is {what}); "
            "prompt tuning and P-tuning need a model that embeds token ids (an nn.Embedding)"
        )
    assert isinstance(found, nn.Module)
    return found


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve_prompt_config(config: PromptConfig, model: nn.Module) -> PromptConfig:
    """Return a copy of ``config`` with every dimension filled from ``model`` (``config`` is not changed).

    * ``token_dim``: the width of :func:`token_embeddings` (not ``hidden_size``: electra and
      OPT-350m embed narrower than their hidden width, and the prompt is an input embedding).
    * ``num_transformer_submodules``: ``None`` -> 1; 2 only for encoder-decoder models.
    * ``num_layers`` / ``num_attention_heads``: informational, as in PEFT; filled from the
      model's text config when ``None``, a value the user gave is kept.
    * ``encoder_hidden_size`` (P-tuning): ``None`` -> ``token_dim``.

    Raises:
        TypeError: ``config`` is not a :class:`PromptTuningConfig` or :class:`PromptEncoderConfig`.
        ValueError: ``token_dim`` disagrees with the model's embedding width,
            ``num_transformer_submodules=2`` on a model with one stack, ``tokenizer_kwargs``
            asks for ``trust_remote_code``, or the model has no token embedding; each message
            names the value and what is accepted.
    """
    if not isinstance(config, (PromptTuningConfig, PromptEncoderConfig)):
        raise TypeError(
            f"config={type(config).__name__} is not accepted; expected a PromptTuningConfig or PromptEncoderConfig"
        )
    weight = embedding_weight(token_embeddings(model))
    assert weight is not None
    width = int(weight.shape[1])
    name = model_type(model)
    if config.token_dim is not None and config.token_dim != width:
        raise ValueError(
            f"token_dim={config.token_dim} but the input embeddings of this {name} model have width {width}; "
            f"leave token_dim=None or set it to {width}"
        )
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if config.num_transformer_submodules == 2 and not is_encoder_decoder:
        raise ValueError(
            f"num_transformer_submodules=2 applies to encoder-decoder models; this {name} model has one "
            "stack: leave it None or set 1"
        )
    if isinstance(config, PromptTuningConfig) and (config.tokenizer_kwargs or {}).get("trust_remote_code"):
        raise ValueError(
            f"tokenizer_kwargs={config.tokenizer_kwargs!r} is not accepted: trust_remote_code=True would run "
            "code from the tokenizer's repository; use a tokenizer that loads without it"
        )
    text_config = _text_config(model)
    changes: dict[str, Any] = {
        "token_dim": width,
        "num_transformer_submodules": config.num_transformer_submodules or 1,
        "num_layers": config.num_layers or _config_int(text_config, "num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": config.num_attention_heads
        or _config_int(text_config, "num_attention_heads", "n_head", "num_heads"),
    }
    if isinstance(config, PromptEncoderConfig):
        changes["encoder_hidden_size"] = config.encoder_hidden_size or width
    return dataclasses.replace(config, **changes)
