"""BERT: bidirectional self-attention through the registry, learned absolute positions.

PEFT passes the prefix as a cache of length ``P``, so BERT numbers the real tokens
``P..P+T-1``; the default offset does the same.
"""

from prefix_hooks.families._encoder import EncoderAdapter

ADAPTER = EncoderAdapter(
    name="bert",
    model_types=("bert",),
    attention_classes=("BertSelfAttention",),
    head_dim_attr="attention_head_size",
)
