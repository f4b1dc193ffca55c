"""ModernBERT: rotary positions (the prefix is not rotated), alternating global and
bidirectional sliding-window layers; every layer sees the whole prefix."""

from prefix_hooks.families._encoder import EncoderAdapter

ADAPTER = EncoderAdapter(
    name="modernbert",
    model_types=("modernbert",),
    attention_classes=("ModernBertAttention",),
    max_positions_attr=None,
)
