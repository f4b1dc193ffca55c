"""The trainable modules of prompt tuning and P-tuning, with PEFT's parameter names.

Both produce ``T = num_virtual_tokens * num_transformer_submodules`` vectors of width
``token_dim`` (the model's input-embedding width) that go in front of the input embeddings.
State dicts match PEFT's ``prompt_encoder.<adapter>.*`` keys without renaming:
``embedding.weight`` (both), ``mlp_head.*`` and ``lstm_head.*`` (P-tuning).

:func:`resolve_prompt_config` and :func:`token_embeddings` (:mod:`prefix_hooks.prompt.resolve`,
which fills a config from the model before a module is built) are importable from here too.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoTokenizer

from prefix_hooks.core.devices import offload_aware_device
from prefix_hooks.core.parameter_versions import parameter_key
from prefix_hooks.prompt.config import (
    PromptConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from prefix_hooks.prompt.resolve import embedding_weight, resolve_prompt_config, token_embeddings

__all__ = [
    "PromptEmbedding",
    "PromptEncoder",
    "build_prompt_module",
    "prompt_embeddings_to_save",
    "resolve_prompt_config",
    "token_embeddings",
]


def _total_virtual_tokens(config: PromptConfig) -> tuple[int, int]:
    """``(T, token_dim)`` of a resolved config."""
    if config.token_dim is None or config.num_transformer_submodules is None:
        raise ValueError(
            f"{type(config).__name__} is not resolved (token_dim={config.token_dim!r}, num_transformer_submodules="
            f"{config.num_transformer_submodules!r}); call resolve_prompt_config(config, model) first"
        )
    return config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim


def _text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The init text's token ids (special tokens included, as the tokenizer adds them),
    truncated, or repeated cyclically, to ``total`` ids."""
    kwargs = dict(config.tokenizer_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no token ids with the tokenizer "
            f"{config.tokenizer_name_or_path!r}; use a text that tokenizes to at least one id"
        )
    repeats = math.ceil(total / len(ids))
    return (ids * repeats)[:total]


def _embedding_rows(
    word_embeddings: nn.Module, word_weight: torch.Tensor, ids: torch.Tensor, init: PromptTuningInit
) -> torch.Tensor:
    """``word_embeddings(ids)`` detached as float32: ``(T, token_dim)``.

    The module is called (not its weight indexed) as PEFT does, so an embedding that scales
    its output (gemma3's, bart's with ``scale_embedding``) gives the vectors real tokens get.
    """
    vocab = word_weight.shape[0]
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(
            f"token id {int(bad[0])} from prompt_tuning_init={init.value!r} is outside the model's vocabulary "
            f"[0, {vocab}); the tokenizer does not match the model"
        )
    with torch.no_grad():
        rows = word_embeddings(ids.to(offload_aware_device(word_embeddings, word_weight)))  # (T, token_dim)
    return rows.detach().clone().to(torch.float32)


class PromptEmbedding(nn.Module):
    """Prompt tuning's ``T`` trainable input embeddings: ``embedding: nn.Embedding(T, token_dim)``, float32.

    Initialisation (skipped in inference mode, where a checkpoint supplies the weights, as in PEFT):

    * ``RANDOM``: ``nn.Embedding``'s default N(0, 1).
    * ``TEXT``: ``AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs)``
      tokenizes ``prompt_tuning_init_text`` with the tokenizer's special tokens (as
      ``tokenizer(text)`` adds them, which is what PEFT uses); the ids are truncated, or
      repeated cyclically, to ``T``, and the rows ``word_embeddings(ids)`` are copied as float32.
    * ``SAMPLE_VOCAB``: ``T`` ids from ``torch.randint(0, vocab, (T,))`` drawn after the
      embedding's own init, exactly PEFT's sequence of draws, so the same torch seed gives
      the same ids and weights as PEFT.

    The module lives on the word embeddings' device (CPU when they are ``None``).

    Args:
        config: a resolved :class:`PromptTuningConfig` (see :func:`resolve_prompt_config`).
        word_embeddings: the model's token embedding (see :func:`token_embeddings`); needed
            for ``TEXT`` and ``SAMPLE_VOCAB`` outside inference mode.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module | None) -> None:
        super().__init__()
        total, token_dim = _total_virtual_tokens(config)
        self.total_virtual_tokens = total
        self.token_dim = token_dim
        # created first, as in PEFT, so later random draws (SAMPLE_VOCAB) see the same RNG state
        self.embedding = nn.Embedding(total, token_dim, dtype=torch.float32)
        init = PromptTuningInit(config.prompt_tuning_init)
        ids: torch.Tensor | None = None
        word_weight = embedding_weight(word_embeddings)
        copies_rows = not config.inference_mode and init is not PromptTuningInit.RANDOM
        if copies_rows and word_weight is None:
            raise ValueError(
                f"prompt_tuning_init={init.value!r} needs the model's word embeddings (an nn.Embedding), "
                f"got {type(word_embeddings).__name__}"
            )
        if copies_rows and word_weight is not None and word_weight.shape[1] != token_dim:
            raise ValueError(
                f"token_dim={token_dim} but the word embeddings have width {word_weight.shape[1]}; "
                f"prompt_tuning_init={init.value!r} copies their rows"
            )
        if copies_rows and init is PromptTuningInit.SAMPLE_VOCAB:
            assert word_weight is not None
            ids = torch.randint(0, int(word_weight.shape[0]), (total,), dtype=torch.long)  # (T,)
        elif copies_rows and init is PromptTuningInit.TEXT:
            ids = torch.tensor(_text_token_ids(config, total), dtype=torch.long)  # (T,)
        if ids is not None:
            assert word_embeddings is not None and word_weight is not None
            rows = _embedding_rows(word_embeddings, word_weight, ids, init)  # (T, token_dim)
            self.embedding.weight = nn.Parameter(rows)
        if word_embeddings is not None and word_weight is not None:
            self.to(offload_aware_device(word_embeddings, word_weight))  # not meta when accelerate offloads them

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` indices in ``[0, T)`` -> ``(B, T, token_dim)`` embeddings."""
        return self.embedding(indices)  # (B, T, token_dim)

    def prompt(self, batch: int) -> torch.Tensor:
        """All ``T`` virtual tokens for ``batch`` rows: ``(batch, T, token_dim)``, a view of the weight."""
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)  # (batch, T, token_dim)


class PromptEncoder(nn.Module):
    """P-tuning's encoder: ``embedding: nn.Embedding(T, token_dim)`` followed by a head.

    * ``MLP``: ``mlp_head = Linear(token_dim, H) - ReLU - Linear(H, H) - ReLU - Linear(H, token_dim)``
      (always three Linear layers; ``encoder_num_layers`` and ``encoder_dropout`` are not used,
      as in PEFT, which warns about the former: we document it instead).
    * ``LSTM``: ``lstm_head = LSTM(token_dim, H, encoder_num_layers, bidirectional, batch_first,
      dropout=encoder_dropout)`` then ``mlp_head = Linear(2H, 2H) - ReLU - Linear(2H, token_dim)``.
      With one LSTM layer the dropout has no effect (PyTorch applies it between layers), so it
      is not passed, which keeps PyTorch from warning.

    ``H = encoder_hidden_size``. In inference mode there is no head: ``embedding`` holds the
    encoder's output (PEFT's saved ``prompt_embeddings``) and the forward is the lookup, as
    PEFT's inference path uses ``embedding.weight`` directly.

    Args:
        config: a resolved :class:`PromptEncoderConfig` (see :func:`resolve_prompt_config`).
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        total, token_dim = _total_virtual_tokens(config)
        hidden = config.encoder_hidden_size
        if hidden is None:
            raise ValueError(
                "PromptEncoder needs a resolved config (encoder_hidden_size=None); call resolve_prompt_config first"
            )
        self.total_virtual_tokens = total
        self.token_dim = token_dim
        self.hidden_size = hidden
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.has_head = not config.inference_mode
        self.dropout = config.encoder_dropout if config.encoder_num_layers > 1 else 0.0
        self.embedding = nn.Embedding(total, token_dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if self.has_head and self.encoder_type is PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=self.dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim)
            )
        elif self.has_head:
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )
        # (parameter identities and versions, encoded prompt): reused while no gradient is needed
        self._encoded: tuple[tuple[object, ...], torch.Tensor] | None = None

    def _encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, T, token_dim)`` embeddings -> ``(B, T, token_dim)`` virtual tokens."""
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds)[0]  # (B, T, 2H)
        if self.mlp_head is not None:
            embeds = self.mlp_head(embeds)  # (B, T, token_dim)
        return embeds

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` indices in ``[0, T)`` -> ``(B, T, token_dim)`` virtual tokens."""
        return self._encode(self.embedding(indices))  # (B, T, token_dim)

    def forget(self) -> None:
        """Drop the cached encoded prompt (its parameters may have changed unseen)."""
        self._encoded = None

    def prompt(self, batch: int) -> torch.Tensor:
        """All ``T`` virtual tokens for ``batch`` rows: ``(batch, T, token_dim)``.

        The head runs once on one row and the result is expanded (a view), as PEFT does.
        While no gradient is needed and the output is deterministic (eval mode, or no LSTM
        dropout) the encoded prompt is cached until a parameter changes, so a generate()
        that re-prepends every step runs the head once.
        """
        weight = self.embedding.weight.unsqueeze(0)  # (1, T, token_dim)
        if not self.has_head:
            return weight.expand(batch, -1, -1)
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        random = self.training and self.dropout > 0
        if needs_grad or random:
            return self._encode(weight).expand(batch, -1, -1)  # (batch, T, token_dim)
        key = parameter_key(self.parameters())
        if self._encoded is None or self._encoded[0] != key:
            with torch.no_grad():
                self._encoded = (key, self._encode(weight))
        return self._encoded[1].expand(batch, -1, -1)  # (batch, T, token_dim)


def build_prompt_module(config: PromptConfig, word_embeddings: nn.Module | None) -> PromptEmbedding | PromptEncoder:
    """The module of a resolved config: :class:`PromptEmbedding` for prompt tuning,
    :class:`PromptEncoder` for P-tuning (which does not use ``word_embeddings``).

    Raises:
        TypeError: ``config`` is neither config type.
        ValueError: the config is not resolved, or ``TEXT``/``SAMPLE_VOCAB`` init lacks usable
            word embeddings or a usable text (messages name the value).
    """
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings)
    if isinstance(config, PromptEncoderConfig):
        module = PromptEncoder(config)
        word_weight = embedding_weight(word_embeddings)
        if word_embeddings is not None and word_weight is not None:
            module.to(offload_aware_device(word_embeddings, word_weight))  # not meta when accelerate offloads them
        return module
    raise TypeError(
        f"config={type(config).__name__} is not accepted; expected a PromptTuningConfig or PromptEncoderConfig"
    )


def prompt_embeddings_to_save(module: PromptEmbedding | PromptEncoder) -> torch.Tensor:
    """What PEFT saves as ``prompt_embeddings``: ``(T, token_dim)``, detached, on CPU.

    Prompt tuning: ``embedding.weight``. P-tuning: the encoder's output for indices
    ``arange(T)`` computed without dropout (what inference uses; PEFT runs the module in its
    current mode, which only differs with LSTM dropout in training mode). Loading this tensor
    into an inference-mode module's ``embedding.weight`` reproduces the prompt.
    """
    if isinstance(module, PromptEmbedding):
        return module.embedding.weight.detach().cpu().clone()
    if not isinstance(module, PromptEncoder):
        raise TypeError(f"module={type(module).__name__} is not accepted; expected a PromptEmbedding or PromptEncoder")
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module._encode(module.embedding.weight.unsqueeze(0))[0]  # (T, token_dim)
    finally:
        module.train(was_training)
    return out.detach().cpu().clone()
