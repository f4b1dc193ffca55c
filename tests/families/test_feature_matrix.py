"""Every method on every supported family, and the feature table of ``docs/families.md`` rendered from this matrix.

Per cell (``feature_matrix.CELLS``): the adapter, with weights that are clearly not a no-op,
changes the model's output; cached greedy ``generate()`` equals uncached (generating families);
detach gives the base output back bit-exactly. Refused cells raise before touching the model.
"""

from __future__ import annotations

from typing import Any

import feature_matrix
import pytest
import tiny_ia3
import tiny_prompt
import torch
from torch import nn

from prefix_hooks import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_adalora,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
    supported,
)
from prefix_hooks.core.attachment import Attachment

NEW_TOKENS = 3


def randomised(method: str, model: nn.Module) -> Attachment:
    """``method``'s adapter on ``model`` (default targets and dimensions), weights that matter."""
    generator = torch.Generator().manual_seed(7)
    if method == "prefix":
        prefix = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
        with torch.no_grad():
            for parameter in prefix.encoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        return prefix
    if method in ("lora", "dora"):  # init_lora_weights=False: B is not zero, so the adapter is not a no-op
        return attach_lora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_dora=method == "dora"))
    if method == "adalora":  # lora_E starts at zero (PEFT's init): draw it so the adapter is not a no-op
        adalora = attach_adalora(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10))
        with torch.no_grad():
            for name, parameter in adalora.named_parameters():
                if ".lora_E." in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
        return adalora
    if method == "prompt":
        return tiny_prompt.randomise_prompt(attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3)))
    if method == "p-tuning":
        return attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16))
    ia3 = attach_ia3(model, IA3Config())
    tiny_ia3.randomise(ia3)
    return ia3


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return tiny_ia3.output_of(model, inputs)


def greedy(model: nn.Module, inputs: dict[str, Any], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        result: Any = model.generate(  # type: ignore[operator]
            **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
            use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
        )
    return result.sequences, torch.stack(result.logits)


def test_the_matrix_covers_every_supported_family_once() -> None:
    families = [family for kind in feature_matrix.KINDS.values() for family in kind]
    assert sorted(families) == sorted(supported())


@pytest.mark.slow
@pytest.mark.parametrize(("method", "family"), feature_matrix.CELLS, ids=[f"{m}-{f}" for m, f in feature_matrix.CELLS])
def test_method_works_on_family(method: str, family: str) -> None:
    model = tiny_ia3.build(family)
    inputs = tiny_ia3.example_inputs(family)
    base = output(model, inputs)
    handle = randomised(method, model)
    with handle:
        adapted = output(model, inputs)
        if family in feature_matrix.GENERATING:
            cached, cached_logits = greedy(model, inputs, use_cache=True)
            uncached, uncached_logits = greedy(model, inputs, use_cache=False)
            assert torch.equal(cached, uncached)
            torch.testing.assert_close(cached_logits, uncached_logits, atol=1e-5, rtol=0)
    assert adapted.shape == base.shape
    assert (adapted - base).abs().max() > 1e-3, "the adapter did not change the output"
    assert torch.equal(output(model, inputs), base)


REFUSED_CELLS = [(m, f) for m, families in feature_matrix.REFUSED.items() for f in families]


@pytest.mark.parametrize(("method", "family"), REFUSED_CELLS, ids=[f"{m}-{f}" for m, f in REFUSED_CELLS])
def test_refused_cells_raise_before_touching_the_model(method: str, family: str) -> None:
    model = tiny_ia3.build(family)
    inputs = tiny_ia3.example_inputs(family)
    base = output(model, inputs)
    with pytest.raises(ValueError, match=family):
        randomised(method, model).attach()
    assert torch.equal(output(model, inputs), base)


def test_families_in_parametrize_ids() -> None:
    assert feature_matrix.families_in("xlm-roberta-sdpa") == {"xlm-roberta"}
    assert feature_matrix.families_in("falcon_mha-eager-left_padded") == {"falcon"}
    assert feature_matrix.families_in("gpt_neo_window") == {"gpt_neo"}
    assert feature_matrix.families_in("gpt2-conv1d") == {"gpt2"}
    assert feature_matrix.families_in("llama-rslora-patterns") == {"llama"}
    assert feature_matrix.families_in("conv2d") == set()


@pytest.mark.slow
def test_the_docs_table_is_rendered_from_the_test_matrix() -> None:
    parity = feature_matrix.parity_cells()
    assert ("prefix", "llama") in parity and ("p-tuning", "bert") in parity and ("ia3", "gpt2") in parity
    assert parity <= set(feature_matrix.CELLS)
    expected = feature_matrix.render(parity)
    got = feature_matrix.page_table(feature_matrix.PAGE.read_text())
    assert got == expected, (
        "docs/families.md's feature table is stale: run `.venv/bin/python tests/support/feature_matrix.py --write`"
    )
