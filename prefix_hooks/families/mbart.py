"""mBART: BART with pre-layer norms; learned absolute positions in both stacks."""

from prefix_hooks.families._seq2seq import EncoderDecoderAdapter

ADAPTER = EncoderDecoderAdapter(
    name="mbart",
    model_types=("mbart",),
    attention_classes=("MBartAttention",),
    encoder_class="MBartEncoder",
    decoder_class="MBartDecoder",
)
