"""CodeGen: GPT-J's attention with a fused, model-parallel-ordered qkv projection; rotary on
part of each head before ``layer_past.update``; the mask is added before the scaling."""

from prefix_hooks.families._inline import InlineAttentionAdapter

ADAPTER = InlineAttentionAdapter(
    name="codegen",
    model_types=("codegen",),
    attention_classes=("CodeGenAttention",),
)
