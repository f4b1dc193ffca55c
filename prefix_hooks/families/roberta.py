"""RoBERTa: BERT's attention; positions counted from ``input_ids`` past the padding index."""

from prefix_hooks.families._encoder import PaddingAwarePositionsAdapter

ADAPTER = PaddingAwarePositionsAdapter(
    name="roberta",
    model_types=("roberta",),
    attention_classes=("RobertaSelfAttention",),
    head_dim_attr="attention_head_size",
)
