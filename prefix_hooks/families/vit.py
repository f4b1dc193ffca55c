"""ViT: image patches plus a CLS token, no position inputs (offset 0)."""

from prefix_hooks.families._encoder import VisionEncoderAdapter

ADAPTER = VisionEncoderAdapter(
    name="vit",
    model_types=("vit",),
    attention_classes=("ViTAttention",),
)
