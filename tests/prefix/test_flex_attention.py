"""flex_attention (inference on CPU): the BlockMask is rebuilt with the prefix term.

Oracle: the same weights and prefix through sdpa, whose mask convention is tested
independently against PEFT and a hand-written attention.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import build_model, random_batch

from prefix_hooks import PrefixTuningConfig, attach_prefix

P = 5
pytestmark = pytest.mark.slow  # flex compiles its kernels on first use


@pytest.mark.parametrize("family", ["llama"])
def test_flex_matches_sdpa_with_prefix(family: str) -> None:
    flex: Any = build_model(family, "flex_attention")
    sdpa: Any = build_model(family, "sdpa")
    assert flex.config._attn_implementation == "flex_attention"
    batch = random_batch(2, 8, left_pad=[3])
    config = PrefixTuningConfig(num_virtual_tokens=P)
    flex_handle, sdpa_handle = attach_prefix(flex, config), attach_prefix(sdpa, config)
    torch.nn.init.normal_(flex_handle.encoder.embedding.weight)
    sdpa_handle.encoder.load_state_dict(flex_handle.encoder.state_dict())
    real = batch["attention_mask"].bool()
    with torch.no_grad(), flex_handle, sdpa_handle:
        flex_logits = flex(**batch).logits
        sdpa_logits = sdpa(**batch).logits
        base_free = flex_handle.disabled()
        with base_free:
            base_logits = flex(**batch).logits
        flex_tokens = flex.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
        sdpa_tokens = sdpa.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(flex_logits[real], sdpa_logits[real], atol=1e-5, rtol=1e-5)
    assert (flex_logits - base_logits)[real].abs().max() > 1e-2  # the prefix really acted
    assert torch.equal(flex_tokens, sdpa_tokens)
