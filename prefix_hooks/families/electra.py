"""ELECTRA: BERT's attention and learned absolute positions (embeddings may be narrower
than the hidden size; the prefix lives at the attention width)."""

from prefix_hooks.families._encoder import EncoderAdapter

ADAPTER = EncoderAdapter(
    name="electra",
    model_types=("electra",),
    attention_classes=("ElectraSelfAttention",),
    head_dim_attr="attention_head_size",
)
