"""DeiT: ViT's attention (CLS and distillation tokens), no position inputs (offset 0)."""

from prefix_hooks.families._encoder import VisionEncoderAdapter

ADAPTER = VisionEncoderAdapter(
    name="deit",
    model_types=("deit",),
    attention_classes=("DeiTAttention",),
)
