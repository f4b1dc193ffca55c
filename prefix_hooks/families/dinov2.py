"""DINOv2: ViT's attention with layer scale, no position inputs (offset 0)."""

from prefix_hooks.families._encoder import VisionEncoderAdapter

ADAPTER = VisionEncoderAdapter(
    name="dinov2",
    model_types=("dinov2",),
    attention_classes=("Dinov2Attention",),
)
