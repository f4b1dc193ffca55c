"""GPT-J: inline eager attention; rotary on the first ``rotary_dim`` features of each head,
applied before ``layer_past.update`` (so the prefix, spliced there, is never rotated)."""

from prefix_hooks.families._inline import InlineAttentionAdapter

ADAPTER = InlineAttentionAdapter(
    name="gptj",
    model_types=("gptj",),
    attention_classes=("GPTJAttention",),
)
