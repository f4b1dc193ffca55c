"""GPT-J: rotary on the first ``rotary_dim`` features of each head, applied before the cache update
(so the prefix, spliced after it, is never rotated).

Up to transformers 5.23 the attention is computed inline and takes the cache as ``layer_past``: a
cache view serves it (eager only). Since 5.24 it calls the attention-function registry and its
layers pass ``**kwargs`` down, so the interposer serves it like a llama-style family, on every
backend the interposer supports (found per module, see :mod:`prefix_hooks.families._inline`).
"""

from prefix_hooks.families._inline import InlineAttentionAdapter

ADAPTER = InlineAttentionAdapter(
    name="gptj",
    model_types=("gptj",),
    attention_classes=("GPTJAttention",),
)
