"""One merged method per weight (``prefix_hooks.core.merged_weights``): each method's probe is asked
before another method merges.

Oracle: a probe written here, and LoRA over a merged (IA)^3 vector (the reverse order is in
``tests/ia3/test_ia3_lifecycle.py``).
"""

from __future__ import annotations

import pytest
from tiny_models import build_model
from torch import nn

from prefix_hooks import IA3Config, LoraConfig, attach_ia3, attach_lora
from prefix_hooks.core import merged_weights
from prefix_hooks.core.merged_weights import MergeProbe, check_no_other_merge, register_merge_probe


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> dict[str, MergeProbe]:
    """The registry, emptied for one test and put back after it."""
    registry: dict[str, MergeProbe] = {}
    monkeypatch.setattr(merged_weights, "_probes", registry)
    return registry


def test_a_module_another_method_merged_into_is_refused(probes: dict[str, MergeProbe]) -> None:
    model, held = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), set()
    register_merge_probe("A", lambda _model, module: "a merged A update" if module in held else None)
    check_no_other_merge(model, {"0": model[0], "1": model[1]}, "B")  # nothing merged
    held.add(model[1])
    check_no_other_merge(model, {"1": model[1]}, "A")  # A may merge again over its own update
    with pytest.raises(RuntimeError, match=r"'1' holds a merged A update; unmerge the A adapter before merging B"):
        check_no_other_merge(model, {"0": model[0], "1": model[1]}, "B")
    assert list(probes) == ["A"]


def test_merging_lora_over_a_merged_ia3_vector_is_refused() -> None:
    model = build_model("llama")
    ia3 = attach_ia3(model, IA3Config())
    lora = attach_lora(model, LoraConfig(r=2, target_modules=["v_proj"]))
    with ia3, lora:
        ia3.merge()
        with pytest.raises(RuntimeError, match=r"'model.layers.0.self_attn.v_proj' holds a merged \(IA\)\^3 vector"):
            lora.merge()
        ia3.unmerge()
        lora.merge()
        assert lora.is_merged
