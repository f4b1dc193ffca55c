"""Configuration of prompt tuning and P-tuning, with the field names, meanings and defaults
of PEFT's ``PromptTuningConfig`` and ``PromptEncoderConfig``.

Both methods put ``T = num_virtual_tokens * num_transformer_submodules`` trainable vectors
of width ``token_dim`` in front of the input embeddings. Prompt tuning (Lester et al., 2021)
learns the vectors directly; P-tuning (Liu et al., 2021) computes them from an embedding
through a small MLP or LSTM encoder. Dimensions left ``None`` are read from the model when
the adapter is built.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType, check_positive_int


class PromptTuningInit(str, enum.Enum):
    """How :class:`PromptTuningConfig` initialises the virtual-token embeddings.

    * ``RANDOM``: ``nn.Embedding``'s default, N(0, 1).
    * ``TEXT``: the model's own word embeddings of ``prompt_tuning_init_text``, its token ids
      truncated, or repeated cyclically, to ``T`` ids.
    * ``SAMPLE_VOCAB``: the model's word embeddings of ``T`` token ids drawn uniformly from the
      vocabulary.
    """

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The head of a P-tuning :class:`PromptEncoder`.

    * ``MLP``: Linear(token_dim, hidden) - ReLU - Linear(hidden, hidden) - ReLU - Linear(hidden, token_dim).
    * ``LSTM``: a bidirectional LSTM (token_dim -> hidden per direction, ``encoder_num_layers``
      layers, ``encoder_dropout`` between them), then Linear(2*hidden, 2*hidden) - ReLU - Linear(2*hidden, token_dim).
    """

    MLP = "MLP"
    LSTM = "LSTM"


AFTER_PADDING = "after_padding"
"""``virtual_token_placement``: each row's virtual tokens right before its first real token."""
PEFT_PLACEMENT = "peft"
"""``virtual_token_placement``: the virtual tokens in front of every row, padding included (PEFT's layout)."""
VIRTUAL_TOKEN_PLACEMENTS = (AFTER_PADDING, PEFT_PLACEMENT)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not accepted; expected True or False")


def _enum_value(enum_type: type[enum.Enum], name: str, value: object) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        accepted = ", ".join(repr(member.value) for member in enum_type)
        raise ValueError(f"{name}={value!r} is not accepted; expected one of {accepted}") from None


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by prompt tuning and P-tuning (PEFT's ``PromptLearningConfig`` subset).

    Args:
        num_virtual_tokens: ``P``, virtual tokens per transformer stack.
        token_dim: width of the virtual tokens, the model's embedding width (``None``: read
            from the model's input embedding).
        num_transformer_submodules: 1, or 2 for an encoder-decoder whose decoder input also
            gets ``P`` virtual tokens (``None``: 1 for every model; PEFT writes 2 for
            ``SEQ_2_SEQ_LM``, which a PEFT checkpoint's config carries).
        num_attention_heads: informational (PEFT records it); ``None``: read from the model.
        num_layers: informational (PEFT records it); ``None``: read from the model.
        modules_to_save: modules trained as full copies beside the prompt (e.g. a fresh
            classification head); PEFT's task models add ``classifier``/``score`` for
            ``SEQ_CLS`` and ``TOKEN_CLS``.
        inference_mode: build the adapter with frozen parameters (and, for P-tuning, without
            the encoder head: its output is precomputed into a plain embedding).
        task_type: the model's task, as in PEFT.
        keep_virtual_outputs: ``False`` (default) removes the virtual positions from the
            model's outputs (logits, hidden states, attentions' query axis) so existing code
            sees the lengths it gave; ``True`` returns them, as PEFT does.
        virtual_token_placement: where a left-padded row's virtual tokens go: ``"after_padding"``
            (default) right before its first real token, ``[pads][virtual][tokens]``, so the row
            computes what it computes alone, with or without ``position_ids``; ``"peft"`` in front
            of the padding, ``[virtual][pads][tokens]``, as PEFT does (its outputs then depend on
            the padding unless ``position_ids`` are given). Rows without left padding are the
            same either way.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    keep_virtual_outputs: bool = False
    virtual_token_placement: str = AFTER_PADDING

    def __post_init__(self) -> None:
        self._check_common_fields()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, allow_none=False)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules!r} is not accepted; "
                "expected 1, 2 or None"
            )
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, (list, tuple))
            or not all(isinstance(name, str) and name for name in self.modules_to_save)
        ):
            raise ValueError(
                f"modules_to_save={self.modules_to_save!r} is not accepted; expected a list of module names or None"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        _check_bool("keep_virtual_outputs", self.keep_virtual_outputs)
        if self.virtual_token_placement not in VIRTUAL_TOKEN_PLACEMENTS:
            accepted = ", ".join(repr(value) for value in VIRTUAL_TOKEN_PLACEMENTS)
            raise ValueError(
                f"virtual_token_placement={self.virtual_token_placement!r} is not accepted; expected one of {accepted}"
            )
        if self.task_type is not None:
            self.task_type = _enum_value(TaskType, "task_type", self.task_type)

    @property
    def total_virtual_tokens(self) -> int:
        """``T = num_virtual_tokens * num_transformer_submodules`` (1 when unresolved)."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021): ``T`` trainable input embeddings in front of the input.

    Args:
        prompt_tuning_init: ``"RANDOM"``, ``"TEXT"`` or ``"SAMPLE_VOCAB"`` (see :class:`PromptTuningInit`).
        prompt_tuning_init_text: the text of ``TEXT`` initialisation (required for it, refused otherwise).
        tokenizer_name_or_path: the tokenizer of ``TEXT`` initialisation (a hub id or a local
            folder, a ``str`` or ``os.PathLike``, loaded with ``AutoTokenizer.from_pretrained``;
            required for it).
        tokenizer_kwargs: extra keyword arguments of ``AutoTokenizer.from_pretrained`` (``TEXT`` only).
        peft_type: always ``"PROMPT_TUNING"``.

    See :class:`PromptLearningConfig` for the shared fields.
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    peft_type: PeftType | str = field(default=PeftType.PROMPT_TUNING, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _enum_value(PromptTuningInit, "prompt_tuning_init", self.prompt_tuning_init)
        text_init = self.prompt_tuning_init is PromptTuningInit.TEXT
        if text_init and (not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text):
            raise ValueError(
                f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} is not accepted with "
                "prompt_tuning_init='TEXT'; expected a non-empty string"
            )
        if isinstance(self.tokenizer_name_or_path, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)
        if text_init and (not isinstance(self.tokenizer_name_or_path, str) or not self.tokenizer_name_or_path):
            raise ValueError(
                f"tokenizer_name_or_path={self.tokenizer_name_or_path!r} is not accepted with "
                "prompt_tuning_init='TEXT'; expected a tokenizer's hub id or local folder"
            )
        if not text_init:
            for name in ("prompt_tuning_init_text", "tokenizer_kwargs"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is only used with prompt_tuning_init='TEXT', "
                        f"not {PromptTuningInit(self.prompt_tuning_init).value!r}; leave it None"
                    )
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is not accepted; expected a dict or None")
        if self.peft_type not in (PeftType.PROMPT_TUNING, PeftType.PROMPT_TUNING.value):
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected 'PROMPT_TUNING'")
        self.peft_type = PeftType.PROMPT_TUNING


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021): virtual tokens computed by a small encoder from an embedding.

    Args:
        encoder_reparameterization_type: ``"MLP"`` (default) or ``"LSTM"`` (see
            :class:`PromptEncoderReparameterizationType`).
        encoder_hidden_size: hidden width of the encoder head (``None``: ``token_dim``).
        encoder_num_layers: LSTM layers (``LSTM`` only; PEFT's MLP always has three Linear layers
            and warns when this is not 2, as the MLP ignores it).
        encoder_dropout: dropout between LSTM layers, ``0 <= p < 1``.
        peft_type: always ``"P_TUNING"``.

    See :class:`PromptLearningConfig` for the shared fields.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    peft_type: PeftType | str = field(default=PeftType.P_TUNING, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(
            PromptEncoderReparameterizationType, "encoder_reparameterization_type", self.encoder_reparameterization_type
        )
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int("encoder_num_layers", self.encoder_num_layers, allow_none=False)
        dropout = self.encoder_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"encoder_dropout={dropout!r} is not accepted; expected a number with 0 <= p < 1")
        self.encoder_dropout = float(dropout)
        if self.peft_type not in (PeftType.P_TUNING, PeftType.P_TUNING.value):
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected 'P_TUNING'")
        self.peft_type = PeftType.P_TUNING


PromptConfig = PromptTuningConfig | PromptEncoderConfig
"""Either prompt-learning config that :func:`~prefix_hooks.prompt.attach_prompt` takes."""
