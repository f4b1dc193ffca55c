"""CodeGen: GPT-J's attention with a fused, model-parallel-ordered qkv projection; rotary on
part of each head before the cache update.

Served like GPT-J: a cache view while the attention is computed inline (transformers <= 5.23,
cache argument ``layer_past``), the interposer since it calls the registry (5.24+).
"""

from prefix_hooks.families._inline import InlineAttentionAdapter

ADAPTER = InlineAttentionAdapter(
    name="codegen",
    model_types=("codegen",),
    attention_classes=("CodeGenAttention",),
)
