"""Small helpers several test modules share: loading an example script as a module, a
character-level tokenizer for pipelines, a causal-LM dataset for Trainer tests, a model's
``state_dict`` compared bit for bit before and after training, passing a cache the way the
installed transformers takes it (:func:`cache_kwargs`, :func:`feed_chunks`), and running PEFT 0.21.2 on a transformers that renamed the
cache argument (:data:`PEFT_CACHE_KEYWORD_STALE`)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from tiny_models import random_batch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LlamaModel, PreTrainedTokenizerFast

from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters

_Model = TypeVar("_Model", bound=nn.Module)

PEFT_CACHE_KEYWORD_STALE: bool = cache_keyword(forward_parameters(LlamaModel.forward)) != "past_key_values"
"""Whether transformers no longer calls the cache ``past_key_values`` (5.24 renamed it ``cache``), the one
name PEFT 0.21.2 knows. There PEFT (``peft/peft_model.py``) is wrong in three places, measured in
``test_peft_breakage.py``:

* ``_prefix_tuning_forward`` looks for ``past_key_values`` in the backbone's ``forward`` signature and
  raises "Model does not support past key values which are required for prefix tuning" for every
  classification, token-classification and question-answering head;
* ``PeftModelForCausalLM.prepare_inputs_for_generation`` and ``PeftModelForSeq2SeqLM``'s read
  ``model_kwargs["past_key_values"]``, which transformers now fills as ``cache``: prompt tuning and P-tuning
  prepend the prompt again at every cached step, and prefix tuning hands its prefix over as
  ``past_key_values`` next to generate()'s ``cache``, which transformers keeps (the prefix is dropped);
* every forward passes ``past_key_values=``, which transformers accepts with a FutureWarning.

Tests compare with PEFT where it is right and use another oracle where this is true."""


def load_example(path: Path, name: str | None = None) -> ModuleType:
    """Import the script at ``path`` as a module named ``name`` (default: its file stem), registered in
    ``sys.modules`` (dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def char_tokenizer(characters: int) -> PreTrainedTokenizerFast:
    """One token per character, no special tokens added: ids 0-2 are ``<pad>``, ``<s>``, ``</s>``
    and ids ``3 .. 2 + characters`` are ``"!"`` and the ``characters - 1`` characters after it."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(ord("!") + i): i + 3 for i in range(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )


class CausalRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``count`` causal-LM rows of ``length`` random tokens (labels = inputs), no padding."""

    def __init__(self, count: int, length: int, seed: int) -> None:
        batch = random_batch(count, length, seed=seed)
        self.rows = [
            {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in ``model.state_dict()``, by name."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bitwise_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """The same names, in the same order, with bit-identical tensors (a :func:`clone_state` pair)."""
    assert list(after) == list(before)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"base tensors changed: {changed}"


def cache_kwargs(model: nn.Module, cache: object) -> dict[str, Any]:
    """``{keyword: cache}`` with the keyword ``model.forward`` takes its cache under (``cache`` since
    transformers 5.24, ``past_key_values`` before), never a deprecated spelling."""
    keyword = cache_keyword(forward_parameters(model))
    assert keyword is not None, f"{type(model).__name__}.forward takes no cache argument"
    return {keyword: cache}


def feed_chunks(
    model: nn.Module,
    input_ids: torch.Tensor,
    plan: list[int],
    cache: Any,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` chunk by chunk (sizes ``plan``) into ``cache``, passed under the keyword the
    installed transformers takes; the logits of all positions ``(B, T, V)``. ``after_chunk(end)`` runs
    after each chunk."""
    logits = []
    start = 0
    for size in plan:
        end = start + size
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :end]  # (B, past + chunk)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, start:end]  # (B, chunk)
        out = model(input_ids=input_ids[:, start:end], use_cache=True, **cache_kwargs(model, cache), **kwargs)
        logits.append(out.logits)
        if after_chunk is not None:
            after_chunk(end)
        start = end
    return torch.cat(logits, dim=1)  # (B, T, V)


def bridge_peft_cache_keyword(peft_model: _Model) -> _Model:
    """``peft_model`` with PEFT's stale cache keyword translated, where :data:`PEFT_CACHE_KEYWORD_STALE`.

    The modules PEFT hands its prefix cache to (its base model and, for classification heads, the
    backbone it calls itself) get an instance ``forward`` that takes ``past_key_values`` and passes it
    on under the module's own keyword: what transformers' deprecation shim does for old callers, minus
    its FutureWarning, and visible in the signature PEFT checks. PEFT's own computation (prompt encoder,
    cache, mask, pooling, head, loss) runs unchanged, so its forward is the oracle it was before 5.24.
    Its generate() is not repaired: a call passing the cache under both names raises. Where transformers
    still takes ``past_key_values`` this returns ``peft_model`` untouched.
    """
    if not PEFT_CACHE_KEYWORD_STALE:
        return peft_model
    base: nn.Module = peft_model.base_model  # type: ignore[assignment]
    modules = [base]
    backbone = getattr(peft_model, "transformer_backbone_name", None)
    if isinstance(backbone, str):
        modules.append(base.get_submodule(backbone))
    for module in modules:
        keyword = cache_keyword(forward_parameters(module))
        if keyword is not None and keyword != "past_key_values":
            module.forward = _taking_past_key_values(module.forward, keyword)
    return peft_model


def _taking_past_key_values(forward: Callable[..., Any], keyword: str) -> Callable[..., Any]:
    """``forward`` with a ``past_key_values`` parameter whose value it receives as ``keyword``."""

    def forward_taking_past_key_values(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            if kwargs.get(keyword) is not None:
                raise RuntimeError(
                    f"PEFT passed the cache as both past_key_values and {keyword} (its generate() on transformers "
                    "5.24+); compare generate() with another oracle there"
                )
            kwargs[keyword] = past_key_values
        return forward(*args, **kwargs)

    return forward_taking_past_key_values


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has activation checkpointing on (what newer transformers releases call
    ``model.is_activation_checkpointing``; older releases spell the property differently)."""
    return any(bool(getattr(module, "gradient_checkpointing", False)) for module in model.modules())
