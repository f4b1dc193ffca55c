"""Configuration of prefix tuning, with the field names and meanings of PEFT's
``PrefixTuningConfig``.

A config says what the user wants; dimensions left as ``None`` are read from the
model when the adapter is built (see :func:`resolve_prefix_config`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prefix_hooks.core.config import AdapterConfig, PeftType, TaskType, check_positive_int

if TYPE_CHECKING:
    from prefix_hooks.prefix.architecture import ModelDims


class EncoderDecoderLayout(str, enum.Enum):
    """Which attention layers of an encoder-decoder get a prefix, and how the prefix tensor is laid out.

    * ``FULL`` (``"full"``): Li & Liang (2021), ``[PREFIX; x; PREFIX'; y]``. Every encoder
      self-attention, decoder self-attention and decoder cross-attention layer has its own
      slot: encoder layers ``0..E-1``, decoder self-attention ``E..E+D-1``, cross-attention
      ``E+D..E+2D-1`` (``num_layers = E + 2D``).
    * ``PEFT`` (``"peft"``): what PEFT 0.21 computes for ``SEQ_2_SEQ_LM``, so that its prefixes
      reproduce. ``num_layers`` slots (PEFT's default: the encoder depth ``E``); only the decoder
      self-attention gets a prefix, decoder layer ``i`` reading slot ``2i mod num_layers``; the
      encoder is untouched and the cross-attention prefix PEFT computes is discarded (as PEFT's
      cache does).
    """

    FULL = "full"
    PEFT = "peft"


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang, 2021): ``P`` trainable key/value vectors in front of
    every attention layer.

    Args:
        num_virtual_tokens: ``P``, the number of prefix positions per layer.
        token_dim: width of one layer's keys, ``kv_heads * head_dim``. ``None`` reads it
            from the model. For grouped-query models this is the *key/value* width, as
            PEFT stores it.
        num_layers: number of attention layers that receive a prefix (``None``: all); for
            encoder-decoders the number of prefix slots of the layout (see
            :class:`EncoderDecoderLayout`).
        num_attention_heads: key/value heads per layer (``None``: read from the model).
        num_transformer_submodules: 1 for decoder-only and encoder-only models, 2 for
            encoder-decoders (``None``: read from the model).
        encoder_hidden_size: hidden width of the projection MLP (``None``: ``token_dim``).
        prefix_projection: reparameterise the prefix through Embedding -> Linear -> Tanh
            -> Linear while training.
        inference_mode: build the folded encoder (a plain embedding) with frozen weights.
        task_type: the model's task, informational as in PEFT.
        position_offset: the position of the first real token. ``None`` means ``P``,
            the convention of PEFT and the paper (the prefix occupies positions
            ``0..P-1``), which reproduces PEFT-trained prefixes exactly. ``0`` keeps the
            model's own positions. For encoder-decoders ``None`` means ``P`` for the decoder
            and ``0`` for the encoder (PEFT shifts only the decoder); an explicit value
            shifts both stacks.
        encoder_decoder_layout: for encoder-decoder models, ``"full"`` (prefixes on encoder
            self-, decoder self- and cross-attention, the paper's method) or ``"peft"``
            (reproduces PEFT 0.21's prefixes); see :class:`EncoderDecoderLayout`. ``None``
            means ``"full"`` for encoder-decoders; other models accept only ``None``.
        modules_to_save: modules trained as full copies beside the prefix (e.g. a fresh
            classification head); as PEFT's task models, ``task_type`` ``SEQ_CLS`` /
            ``TOKEN_CLS`` also trains ``classifier`` / ``score`` and ``QUESTION_ANS``
            ``qa_outputs`` (where the model has them).
        peft_type: always ``"PREFIX_TUNING"``.
    """

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    position_offset: int | None = None
    encoder_decoder_layout: EncoderDecoderLayout | str | None = None
    modules_to_save: list[str] | None = None
    peft_type: PeftType | str = field(default=PeftType.PREFIX_TUNING, kw_only=True)

    def __post_init__(self) -> None:
        self._check_common_fields()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, allow_none=False)
        for name in ("token_dim", "num_layers", "num_attention_heads", "encoder_hidden_size"):
            check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules!r} is not accepted; "
                "expected 1, 2 or None"
            )
        for name in ("prefix_projection", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted; expected a bool")
        if self.position_offset is not None and (
            isinstance(self.position_offset, bool)
            or not isinstance(self.position_offset, int)
            or self.position_offset < 0
        ):
            raise ValueError(
                f"position_offset={self.position_offset!r} is not accepted; "
                "expected an int >= 0 or None (None means num_virtual_tokens)"
            )
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                accepted = ", ".join(t.value for t in TaskType)
                raise ValueError(
                    f"task_type={self.task_type!r} is not accepted; expected one of {accepted} or None"
                ) from None
        if self.encoder_decoder_layout is not None:
            try:
                self.encoder_decoder_layout = EncoderDecoderLayout(self.encoder_decoder_layout)
            except ValueError:
                raise ValueError(
                    f"encoder_decoder_layout={self.encoder_decoder_layout!r} is not accepted; expected 'full' "
                    "(prefixes on encoder, decoder and cross-attention), 'peft' (PEFT's decoder-only layout) or None"
                ) from None
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple, set)) or not all(
                isinstance(name, str) and name for name in self.modules_to_save
            ):
                raise ValueError(
                    f"modules_to_save={self.modules_to_save!r} is not accepted; expected a list of module names or None"
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.peft_type not in (PeftType.PREFIX_TUNING, PeftType.PREFIX_TUNING.value):
            raise ValueError(f"peft_type={self.peft_type!r} is not accepted; expected 'PREFIX_TUNING'")
        self.peft_type = PeftType.PREFIX_TUNING

    @property
    def effective_position_offset(self) -> int:
        """Position of the first real token: ``position_offset``, or ``P`` when unset."""
        return self.num_virtual_tokens if self.position_offset is None else self.position_offset


def resolve_prefix_config(config: PrefixTuningConfig, dims: ModelDims) -> PrefixTuningConfig:
    """Return a copy of ``config`` with every dimension filled from ``dims``.

    Raises:
        ValueError: a dimension the user gave disagrees with the model; the message
            names the value and what the model accepts.
    """
    kv_width = dims.kv_heads * dims.head_dim
    if config.num_layers is not None and config.num_layers != dims.num_layers:
        raise ValueError(
            f"num_layers={config.num_layers} but the model has {dims.num_layers} attention layers; "
            f"leave num_layers=None or set it to {dims.num_layers}"
        )
    if config.token_dim is not None and config.token_dim != kv_width:
        raise ValueError(
            f"token_dim={config.token_dim} but the model's attention layers produce keys of width "
            f"{kv_width} ({dims.kv_heads} key/value heads x head_dim {dims.head_dim}); "
            f"leave token_dim=None or set it to {kv_width}"
        )
    if config.num_attention_heads is not None and config.num_attention_heads != dims.kv_heads:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} but the model's keys have "
            f"{dims.kv_heads} heads (the prefix is stored at the key/value head count, as PEFT does "
            f"for grouped-query models); leave it None or set it to {dims.kv_heads}"
        )
    if config.num_transformer_submodules not in (None, dims.num_transformer_submodules):
        stacks = "an encoder and a decoder stack" if dims.num_transformer_submodules == 2 else "one stack"
        raise ValueError(
            f"num_transformer_submodules={config.num_transformer_submodules} but this "
            f"{dims.model_type} model takes {dims.num_transformer_submodules} ({stacks}); leave it None or set "
            f"{dims.num_transformer_submodules}"
        )
    layout = config.encoder_decoder_layout
    if dims.num_transformer_submodules == 1 and layout is not None:
        raise ValueError(
            f"encoder_decoder_layout={EncoderDecoderLayout(layout).value!r} applies to encoder-decoder models; "
            f"this {dims.model_type} model has one stack: leave it None"
        )
    if dims.num_transformer_submodules == 2 and layout is None:
        layout = EncoderDecoderLayout.FULL
    return dataclasses.replace(
        config,
        num_layers=dims.num_layers,
        token_dim=kv_width,
        num_attention_heads=dims.kv_heads,
        num_transformer_submodules=dims.num_transformer_submodules,
        encoder_hidden_size=config.encoder_hidden_size or kv_width,
        encoder_decoder_layout=layout,
    )
