"""XLM-RoBERTa: RoBERTa's attention and padding-aware positions."""

from prefix_hooks.families._encoder import PaddingAwarePositionsAdapter

ADAPTER = PaddingAwarePositionsAdapter(
    name="xlm-roberta",
    model_types=("xlm-roberta",),
    attention_classes=("XLMRobertaSelfAttention",),
    head_dim_attr="attention_head_size",
)
