"""DistilBERT: attention modules without ``layer_idx`` (slots follow layer order), learned
absolute positions taken as ``position_ids``."""

from prefix_hooks.families._encoder import EncoderAdapter

ADAPTER = EncoderAdapter(
    name="distilbert",
    model_types=("distilbert",),
    attention_classes=("DistilBertSelfAttention",),
    head_dim_attr="attention_head_size",
)
