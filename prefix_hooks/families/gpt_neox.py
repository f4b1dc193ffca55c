"""GPT-NeoX: fused query_key_value projection, partial rotary; head size is head_size."""

from prefix_hooks.prefix.architecture import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    attention_classes=("GPTNeoXAttention",),
    head_dim_attr="head_size",
)
