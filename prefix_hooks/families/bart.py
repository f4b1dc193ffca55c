"""BART: learned absolute positions in both stacks, looked up inside the stacks."""

from prefix_hooks.families._seq2seq import EncoderDecoderAdapter

ADAPTER = EncoderDecoderAdapter(
    name="bart",
    model_types=("bart",),
    attention_classes=("BartAttention",),
    encoder_class="BartEncoder",
    decoder_class="BartDecoder",
)
