"""GPT-Neo: global and local (windowed) layers, learned absolute positions, layer index ``layer_id``.

The causal/window pattern is not in the mask: each layer slices its own ``bias`` buffer
by key *slot* (``bias[S_k - T : S_k, :S_k]``). With the prefix in front of the keys, the
prefix takes the ``P`` slots right before the first token, exactly where PEFT (which
caches it) puts it: global layers always see it, and a local layer sees it only while it
lies inside the window (queries at slot ``< window_size`` counting the prefix and any
left padding), as in PEFT. The wrapper ``GPTNeoAttention`` is not hooked.
"""

from prefix_hooks.families._inline import InlineAttentionAdapter

ADAPTER = InlineAttentionAdapter(
    name="gpt_neo",
    model_types=("gpt_neo",),
    attention_classes=("GPTNeoSelfAttention",),
    layer_attr="layer_id",
)
