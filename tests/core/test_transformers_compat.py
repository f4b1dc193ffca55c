"""The compatibility layer finds the cache by what it is, and decoding through ``forward`` is
right whichever keyword the caller uses.

Oracle for decoding: the logits of one forward over the whole sequence, with the adapter
attached, against a prefill followed by one-token steps through ``model(...)`` with a user
``DynamicCache`` and no ``position_ids`` (the loop streaming servers write). On transformers
5.24+ the old keyword ``past_key_values`` still works for callers (with transformers'
FutureWarning) but is renamed inside ``forward``, after our hooks ran: both spellings must give
the full forward's logits.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import tiny_inline
import tiny_models
import tiny_prompt
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from prefix_hooks import PrefixTuningConfig, PromptTuningConfig, attach_prefix, attach_prompt
from prefix_hooks.core import transformers_compat
from prefix_hooks.core.attachment import Attachment
from prefix_hooks.core.transformers_compat import (
    CACHE_KEYWORDS,
    UntestedTransformersWarning,
    attends_through_registry,
    cache_keyword,
    cache_length_keyword,
    check_installed_version,
    find_cache,
    forward_parameters,
    output_cache,
    unknown_cache_parameters,
)
from prefix_hooks.families import ForwardCall

ATOL = 1e-4
DECODERS = ("llama", "gpt2", "opt", "gpt_neox", *tiny_inline.FAMILIES)
PROMPT_DECODERS = ("llama", "gpt2", "opt", "gpt_neox")


def current_keyword(model: nn.Module) -> str:
    keyword = cache_keyword(forward_parameters(model))
    assert keyword is not None
    return keyword


def build(family: str) -> PreTrainedModel:
    if family in tiny_inline.FAMILIES:
        return tiny_inline.build(family, "eager", seed=0)
    return tiny_models.build_model(family, "sdpa", seed=0)


def attach(method: str, model: PreTrainedModel) -> Attachment:
    if method == "prefix":
        handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for parameter in handle.encoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        return handle
    return tiny_prompt.randomise_prompt(attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3)))


def decode_steps(model: PreTrainedModel, ids: torch.Tensor, keyword: str, prefill: int) -> torch.Tensor:
    """Logits ``(1, T - prefill + 1, V)``: a prefill of ``prefill`` tokens, then one token per call."""
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.no_grad():
        out = model(ids[:, :prefill], **{keyword: cache}, use_cache=True)
        steps.append(out.logits[:, -1:])
        for index in range(prefill, ids.shape[1]):
            out = model(ids[:, index : index + 1], **{keyword: cache}, use_cache=True)
            steps.append(out.logits)
    returned = output_cache(out)
    assert getattr(returned, "__wrapped__", returned) is cache  # a prompt returns a view over it
    return torch.cat(steps, dim=1)


CELLS = [("prefix", family) for family in DECODERS] + [("prompt", family) for family in PROMPT_DECODERS]


@pytest.mark.parametrize("keyword_kind", ["current", "old"])
@pytest.mark.parametrize(("method", "family"), CELLS, ids=[f"{method}-{family}" for method, family in CELLS])
def test_decoding_through_forward_equals_one_forward(method: str, family: str, keyword_kind: str) -> None:
    model = build(family)
    ids = torch.randint(3, tiny_models.VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    keyword = current_keyword(model) if keyword_kind == "current" else "past_key_values"
    with torch.no_grad():
        base = model(ids).logits
    with attach(method, model):
        with torch.no_grad():
            full = model(ids).logits  # (1, T, V)
        assert (full - base).abs().max() > 1e-3, "the adapter must matter, or this proves nothing"
        with warnings.catch_warnings():
            # the old keyword on 5.24+ is transformers' own deprecation, which is the point here
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            steps = decode_steps(model, ids, keyword, prefill=4)
    torch.testing.assert_close(steps, full[:, 3:], atol=ATOL, rtol=0)


class _Forward:
    def forward(self, input_ids: Any = None, attention_mask: Any = None, cache: Any = None,
                **kwargs: Any) -> None: ...


def call(positional: tuple[Any, ...] = (), **kwargs: Any) -> ForwardCall:
    return ForwardCall(forward_parameters(_Forward().forward), positional, kwargs)


def test_find_cache_by_any_spelling_by_position_and_by_type() -> None:
    cache = DynamicCache()
    for keyword in CACHE_KEYWORDS:
        by_keyword: dict[str, Any] = {keyword: cache}
        assert find_cache(call(**by_keyword)) == (keyword, cache)
    assert find_cache(call((None, None, cache))) == ("cache", cache)
    assert find_cache(call(kv_store_of_the_future=cache)) == ("kv_store_of_the_future", cache)
    assert find_cache(call(input_ids=torch.ones(1, 2))) == (None, None)
    with pytest.raises(ValueError, match="passed twice, as cache and past_key_values"):
        find_cache(call(cache=cache, past_key_values=cache))


def test_keywords_are_read_from_signatures() -> None:
    model = tiny_models.build_model("llama")
    assert cache_keyword(forward_parameters(model)) in ("cache", "past_key_values")
    opt = tiny_models.build_model("opt")
    table = opt.model.decoder.embed_positions
    assert cache_length_keyword(forward_parameters(table)) in ("cache_length", "past_key_values_length")
    attention = model.model.layers[0].self_attn
    assert attends_through_registry(attention)
    assert not attends_through_registry(nn.Linear(2, 2))


def test_output_cache_reads_the_cache_without_the_deprecated_attribute() -> None:
    model = tiny_models.build_model("llama")
    with torch.no_grad():
        out = model(torch.ones(1, 3, dtype=torch.long), use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    assert output_cache((torch.zeros(1),)) is None


def test_a_renamed_cache_argument_is_refused_before_attaching() -> None:
    assert unknown_cache_parameters(["input_ids", "kv_store_cache", "use_cache", "cache_position"]) == [
        "kv_store_cache"
    ]
    assert unknown_cache_parameters(["input_ids", "cache", "use_cache"]) == []
    model = tiny_models.build_model("llama")

    def renamed_forward(input_ids: Any = None, inputs_embeds: Any = None, position_ids: Any = None,
                        kv_store_cache: Any = None, **kwargs: Any) -> Any:
        raise AssertionError("never called")

    model.model.forward = renamed_forward
    hooks_before = dict(model.model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="'kv_store_cache', which looks like a cache argument"):
        attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=2)).attach()
    assert dict(model.model._forward_pre_hooks) == hooks_before
    model.forward = renamed_forward
    with pytest.raises(RuntimeError, match="kv_store_cache"):
        attach_prompt(model, PromptTuningConfig(num_virtual_tokens=2)).attach()


def test_a_transformers_outside_the_tested_range_warns_naming_both_versions() -> None:
    newest, oldest = transformers_compat.NEWEST_TESTED, transformers_compat.OLDEST_TESTED
    assert check_installed_version(newest) is None
    assert check_installed_version(oldest) is None
    major, minor = newest.split(".")[:2]
    newer = f"{major}.{int(minor) + 1}.0.dev0"
    major, minor = oldest.split(".")[:2]
    older = f"{major}.{int(minor) - 1}.3"
    for version, relation in ((newer, "newer than the newest"), (older, "older than the oldest")):
        with pytest.warns(UntestedTransformersWarning) as record:
            message = check_installed_version(version)
        assert message is not None and relation in message
        assert version in message and newest in message and oldest in message and "prefix_hooks.check" in message
        assert len(record) == 1


def test_the_installed_transformers_is_inside_the_tested_range() -> None:
    import transformers

    assert check_installed_version(transformers.__version__) is None
