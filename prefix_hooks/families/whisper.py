"""Whisper: audio encoder with fixed positions for all its frames, text decoder with learned ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from prefix_hooks.families._seq2seq import ENCODER, EncoderDecoderAdapter, Seq2SeqSite
from prefix_hooks.prefix.architecture import CurrentState

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack


@dataclass(frozen=True)
class WhisperAdapter(EncoderDecoderAdapter):
    """The encoder adds its whole position table to exactly ``max_source_positions`` frames,
    so its positions cannot move; the decoder's can."""

    def position_offset_error(self, root: nn.Module, offset: int) -> str | None:
        if offset and self.stack_role(root) == ENCODER:
            return (
                f"position_offset={offset} would shift whisper's encoder positions, which are fixed for its "
                f"{getattr(root.config, 'max_source_positions', 'all')} frames; leave position_offset=None (decoder offset P, "
                "encoder 0) or set 0"
            )
        return super().position_offset_error(root, offset)

    def install_stack_hooks(
        self, stack: nn.Module, sites: list[Seq2SeqSite], current_state: CurrentState, undo: UndoStack
    ) -> None:
        if self.stack_role(stack) != ENCODER:
            super().install_stack_hooks(stack, sites, current_state, undo)


ADAPTER = WhisperAdapter(
    name="whisper",
    model_types=("whisper",),
    attention_classes=("WhisperAttention",),
    encoder_class="WhisperEncoder",
    decoder_class="WhisperDecoder",
)
