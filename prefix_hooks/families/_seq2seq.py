"""What every encoder-decoder family shares: two stacks, three kinds of attention, two layouts.

Sites. An encoder-decoder has encoder self-attention (role ``"encoder"``), decoder
self-attention (``"decoder"``) and decoder cross-attention (``"cross"``). How they map to
prefix slots is the :class:`~prefix_hooks.prefix.config.EncoderDecoderLayout`:

* ``full`` (Li & Liang, ``[PREFIX; x; PREFIX'; y]``): every layer of each kind has its own slot,
  encoder ``0..E-1``, decoder self ``E..E+D-1``, cross ``E+D..E+2D-1``; the depths may differ.
* ``peft`` (PEFT 0.21, ``SEQ_2_SEQ_LM``): ``num_layers`` slots (PEFT's default: the encoder depth
  ``E``). PEFT doubles the tensor and cuts it into per-layer groups of four (self keys, self
  values, cross keys, cross values), so decoder layer ``i`` reads slot ``2i mod num_layers`` for
  its self-attention; the cross-attention slot ``2i+1 mod num_layers`` is thrown away when PEFT
  replaces the cross-attention cache, and the encoder gets nothing.

Roots. ``generate()`` runs the encoder stack on its own and then the decoder step by step, so
each stack that has sites is a root (see :meth:`ArchitectureAdapter.roots`).

Positions. ``position_offset=None`` means ``P`` for the decoder (PEFT's decoder tokens follow its
cached prefix) and ``0`` for the encoder (PEFT leaves the encoder alone, and Li & Liang's BART
kept its encoder positions). An explicit offset shifts both stacks. Learned positions are
shifted where the stack looks them up (a pre-hook on ``embed_positions``), since BART-style
stacks take no ``position_ids``; the hook reads the offset of the running forward's root.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.transformers_compat import CACHE_LENGTH_KEYWORDS, cache_length_keyword, forward_parameters
from prefix_hooks.prefix.architecture import ArchitectureAdapter, AttentionSite, CurrentState
from prefix_hooks.prefix.config import EncoderDecoderLayout, PrefixTuningConfig

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack

ENCODER, DECODER, CROSS = "encoder", "decoder", "cross"


@dataclass(frozen=True)
class Seq2SeqSite(AttentionSite):
    """An attention site of an encoder-decoder, with what the family's hooks need to know.

    Attributes:
        stack: the encoder or decoder stack (a root) that runs the module.
        num_virtual_tokens: ``P``.
        layout: the layout the site belongs to.
    """

    stack: nn.Module | None = None
    num_virtual_tokens: int = 0
    layout: EncoderDecoderLayout = EncoderDecoderLayout.FULL


@dataclass(frozen=True)
class Stacks:
    """The encoder and decoder stacks of a model (``None`` where the model has none)."""

    encoder: nn.Module | None
    decoder: nn.Module | None


@dataclass(frozen=True)
class EncoderDecoderAdapter(ArchitectureAdapter):
    """An encoder-decoder whose attention modules call the attention-function registry.

    Attributes:
        encoder_class, decoder_class: class names of the encoder and decoder stacks.
        cross_attention_name: attribute name of the cross-attention module in a decoder layer.
        heads_attr: attribute of the attention module holding its (key/value) head count.
    """

    encoder_class: str = ""
    decoder_class: str = ""
    cross_attention_name: str = "encoder_attn"
    heads_attr: str = "num_heads"
    num_transformer_submodules: int = 2

    # --- structure ---------------------------------------------------------------------------
    def stack_role(self, module: nn.Module) -> str | None:
        """``"encoder"``, ``"decoder"`` or ``None`` (not a stack)."""
        name = type(module).__name__
        if name == self.encoder_class:
            return ENCODER
        if name == self.decoder_class:
            return DECODER
        return None

    def stacks(self, model: nn.Module) -> Stacks:
        """The first encoder and decoder stack found in ``model``."""
        found: dict[str, nn.Module] = {}
        for module in model.modules():
            role = self.stack_role(module)
            if role is not None:
                found.setdefault(role, module)
        return Stacks(found.get(ENCODER), found.get(DECODER))

    def attention_modules(self, stack: nn.Module | None) -> tuple[list[nn.Module], list[nn.Module]]:
        """``(self-attention, cross-attention)`` modules of ``stack``, in layer order."""
        own: list[nn.Module] = []
        cross: list[nn.Module] = []
        if stack is None:
            return own, cross
        for name, module in stack.named_modules():
            if type(module).__name__ in self.attention_classes:
                (cross if name.rsplit(".", 1)[-1] == self.cross_attention_name else own).append(module)
        return own, cross

    def kv_shape(self, module: nn.Module, config: object) -> tuple[int, int]:
        return int(getattr(module, self.heads_attr)), int(getattr(module, self.head_dim_attr))

    # --- layout ------------------------------------------------------------------------------
    def attention_sites(self, model: nn.Module, config: PrefixTuningConfig | None = None) -> list[AttentionSite]:
        """The sites of ``config.encoder_decoder_layout`` (``None``: ``"full"``), ordered by slot.

        Raises:
            ValueError: ``num_layers`` does not fit the layout, or the ``"peft"`` layout meets a
                decoder deeper than its ``num_layers`` (PEFT itself fails there).
        """
        config = config or PrefixTuningConfig()
        layout = EncoderDecoderLayout(config.encoder_decoder_layout or EncoderDecoderLayout.FULL)
        stacks = self.stacks(model)
        encoder_self, _ = self.attention_modules(stacks.encoder)
        decoder_self, cross = self.attention_modules(stacks.decoder)
        depth_e, depth_d = len(encoder_self), len(decoder_self)

        def site(module: nn.Module, slot: int, role: str, stack: nn.Module | None) -> Seq2SeqSite:
            kv_heads, head_dim = self.kv_shape(module, model.config)
            return Seq2SeqSite(module, slot, kv_heads, head_dim, role, stack, config.num_virtual_tokens, layout)

        if layout is EncoderDecoderLayout.PEFT:
            num_slots = self._peft_num_slots(config, depth_e, depth_d)
            return [site(module, 2 * i % num_slots, DECODER, stacks.decoder) for i, module in enumerate(decoder_self)]
        total = depth_e + 2 * depth_d
        if config.num_layers not in (None, total):
            raise ValueError(
                f"num_layers={config.num_layers} but encoder_decoder_layout='full' gives this {self.name} model "
                f"{total} prefix slots ({depth_e} encoder + {depth_d} decoder self-attention + {len(cross)} "
                f"cross-attention layers); leave num_layers=None or set it to {total}, or load a PEFT-trained "
                "prefix with encoder_decoder_layout='peft'"
            )
        return [
            *(site(module, i, ENCODER, stacks.encoder) for i, module in enumerate(encoder_self)),
            *(site(module, depth_e + i, DECODER, stacks.decoder) for i, module in enumerate(decoder_self)),
            *(site(module, depth_e + depth_d + i, CROSS, stacks.decoder) for i, module in enumerate(cross)),
        ]

    def _peft_num_slots(self, config: PrefixTuningConfig, depth_e: int, depth_d: int) -> int:
        num_slots = config.num_layers or depth_e  # PEFT's default: config.num_hidden_layers, the encoder depth
        if depth_d == 0:
            raise ValueError(f"encoder_decoder_layout='peft' needs a decoder stack; this {self.name} model has none")
        if depth_d > num_slots:
            raise ValueError(
                f"encoder_decoder_layout='peft' reproduces PEFT, whose prefix cache has num_layers={num_slots} layers, "
                f"but this {self.name} decoder has {depth_d} (PEFT fails on it); set num_layers >= {depth_d} or use "
                "encoder_decoder_layout='full'"
            )
        return num_slots

    def num_slots(self, model: nn.Module, config: PrefixTuningConfig, sites: Sequence[AttentionSite]) -> int:
        """``E + 2D`` in the full layout, ``num_layers`` (default ``E``) in PEFT's."""
        if EncoderDecoderLayout(config.encoder_decoder_layout or EncoderDecoderLayout.FULL) is EncoderDecoderLayout.PEFT:
            stacks = self.stacks(model)
            depth_e = len(self.attention_modules(stacks.encoder)[0])
            depth_d = len(self.attention_modules(stacks.decoder)[0])
            return self._peft_num_slots(config, depth_e, depth_d)
        return len({site.layer for site in sites})

    def roots(self, model: nn.Module, sites: Sequence[AttentionSite]) -> list[nn.Module]:
        """The stacks that run at least one site, encoder first."""
        return list(_sites_by_stack(sites))

    # --- positions ---------------------------------------------------------------------------
    def default_position_offset(self, root: nn.Module, num_virtual_tokens: int) -> int:
        """``P`` for the decoder stack, 0 for the encoder stack."""
        return num_virtual_tokens if self.stack_role(root) == DECODER else 0

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        if offset and not isinstance(getattr(root, "embed_positions", None), nn.Embedding):
            return (
                f"position_offset={offset} needs learned positions, which {type(root).__name__} does not look up "
                "through an embed_positions table; set position_offset=0"
            )
        return None

    def offset_positions(self, call: ForwardCall, offset: int) -> None:
        """Nothing to do on the call: the stack's ``embed_positions`` hook shifts the positions."""

    # --- hooks -------------------------------------------------------------------------------
    def interposer_serves(self, site: AttentionSite) -> bool:
        return False  # the stacks' caches are an EncoderDecoderCache's: never kept prefixed

    def install_site_hooks(self, sites: list[AttentionSite], current_state: CurrentState, undo: UndoStack) -> None:
        """Install :meth:`install_stack_hooks` on every root stack."""
        for stack, stack_sites in _sites_by_stack(sites).items():
            self.install_stack_hooks(stack, stack_sites, current_state, undo)

    def install_stack_hooks(
        self, stack: nn.Module, sites: list[Seq2SeqSite], current_state: CurrentState, undo: UndoStack
    ) -> None:
        """Per-stack hooks; the default shifts the stack's ``embed_positions`` lookups."""
        table = getattr(stack, "embed_positions", None)
        if isinstance(table, nn.Embedding):
            handle = table.register_forward_pre_hook(_position_shift(current_state, table), with_kwargs=True)
            undo.push(handle.remove)


def _sites_by_stack(sites: Sequence[AttentionSite]) -> dict[nn.Module, list[Seq2SeqSite]]:
    """The sites grouped by the stack that runs them, in order of first appearance."""
    groups: dict[nn.Module, list[Seq2SeqSite]] = {}
    for site in sites:
        if not isinstance(site, Seq2SeqSite) or site.stack is None:
            raise ValueError(f"attention site {type(site.module).__name__} (slot {site.layer}) has no stack")
        groups.setdefault(site.stack, []).append(site)
    return groups


def _position_shift(current_state: CurrentState, table: nn.Module) -> Any:
    """A pre-hook for a learned-position table called as ``(ids, cache_length=0, position_ids=None)``
    (``past_key_values_length`` before transformers 5.24): adds the running forward's offset to the
    positions it looks up. A partial, not a closure: a copy of the attached model rebinds it."""
    length_keyword = cache_length_keyword(forward_parameters(table))
    if length_keyword is None:
        raise ValueError(
            f"{type(table).__name__}.forward takes none of {CACHE_LENGTH_KEYWORDS}; cannot shift its positions"
        )
    return functools.partial(_shift_positions, current_state, length_keyword)


def _shift_positions(
    current_state: CurrentState, length_keyword: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    state = current_state()
    offset = state.position_offset if state is not None else 0
    if not offset:
        return None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + offset  # (B|1, T) or (T,)
    elif len(args) > 1:
        args = (args[0], args[1] + offset, *args[2:])
    else:
        kwargs[length_keyword] = kwargs.get(length_keyword, 0) + offset
    return args, kwargs
