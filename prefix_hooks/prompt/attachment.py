"""Prompt tuning and P-tuning attached through hooks: ``attach_prompt``.

``P`` trainable virtual-token embeddings go in front of the input embeddings. On attach, in
this order (each step undone on detach, in reverse):

1. every base parameter is frozen (flags recorded);
2. the prompt module is registered under the model as ``prompt_hooks_<adapter>`` (so
   ``model.parameters()`` and Trainer's optimizer see it);
3. a forward pre-hook on the *prompt root* (the model itself; the encoder of an
   encoder-decoder) replaces ``input_ids`` by ``inputs_embeds = cat(prompt, embed(input_ids))``
   and makes room for the virtual tokens in ``attention_mask`` (ones), ``position_ids``
   (``0..P-1``, real ones ``+ P``), ``token_type_ids`` (zeros) and per-token ``labels`` (-100);
4. a forward hook on the model removes the virtual positions from per-token outputs (unless
   ``keep_virtual_outputs``) and remembers the cache objects that hold the virtual tokens;
5. for an encoder-decoder, a pre-hook on the decoder extends the cross-attention mask when the
   encoder output carries the virtual tokens.

Generation needs nothing special: ``generate()`` calls the model with the real tokens only.
The first call (no cache, or an empty one) prepends the prompt; a later call with a cache that
already holds the virtual tokens only extends the mask and shifts ``position_ids`` by ``P``.
Without a cache (``use_cache=False``) every call prepends.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from prefix_hooks import parameter_versions
from prefix_hooks.attachment import Attachment, UndoStack, attachments_of, freeze_parameters, register_child
from prefix_hooks.config import TaskType
from prefix_hooks.devices import compute_device
from prefix_hooks.families.base import ForwardCall
from prefix_hooks.prefix import PrefixAttachment
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig
from prefix_hooks.prompt.inputs import (
    IGNORE_INDEX,
    prepend_filler,
    prepend_mask,
    prepend_positions,
    prepend_prompt,
    trim_virtual_outputs,
)
from prefix_hooks.prompt.modules import (
    PromptEmbedding,
    PromptEncoder,
    build_prompt_module,
    resolve_prompt_config,
    token_embeddings,
)
from prefix_hooks.saved_modules import SavedModules, task_heads
from prefix_hooks.transformers_compat import find_cache, output_cache, require_known_cache_parameter

_PER_TOKEN_TASKS = frozenset({TaskType.CAUSAL_LM, TaskType.TOKEN_CLS})
_PER_TOKEN_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForTokenClassification", "ForMaskedLM")


@dataclass(frozen=True)
class _Root:
    """A module whose forward gets a pre-hook, with its ``forward`` parameter names."""

    module: nn.Module
    params: list[str]

    @classmethod
    def of(cls, module: nn.Module) -> _Root:
        return cls(module, list(inspect.signature(module.forward).parameters))


@dataclass(frozen=True)
class _Prepended:
    """What the prompt root's pre-hook did to the current call: ``length`` real tokens got the
    prompt in front; ``to_tuple``: the caller asked for a tuple (``return_dict=False``)."""

    length: int
    to_tuple: bool


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def _prompt_root(model: nn.Module) -> nn.Module:
    """The module whose token inputs get the prompt: the encoder of an encoder-decoder, else the model.

    Raises:
        ValueError: a multimodal model, or the module takes no ``input_ids`` / ``inputs_embeds``.
    """
    config = getattr(model, "config", None)
    model_type = _model_type(model)
    if getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None:
        raise ValueError(
            f"model_type={model_type!r} is multimodal; prompt tuning supports text models only (its image or audio "
            "features sit among the token embeddings)"
        )
    root = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model  # type: ignore[operator]
    require_known_cache_parameter(root)
    params = inspect.signature(root.forward).parameters
    missing = [name for name in ("input_ids", "inputs_embeds") if name not in params]
    if missing:
        raise ValueError(
            f"model_type={model_type!r}: {type(root).__name__}.forward takes no {' / '.join(missing)}; prompt tuning "
            "puts the virtual tokens in front of token embeddings (models with vision or audio inputs are not "
            "supported)"
        )
    return root


def _labels_per_token(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> bool:
    """Whether ``labels`` has one entry per input token (causal LM, token classification, masked LM)."""
    if config.task_type is not None:
        return config.task_type in _PER_TOKEN_TASKS
    return type(model).__name__.endswith(_PER_TOKEN_CLASS_SUFFIXES)


def _predicts_next_token(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> bool:
    """Whether ``model``'s loss shifts the labels (a causal LM)."""
    if config.task_type is not None:
        return config.task_type == TaskType.CAUSAL_LM
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _pools_last_position(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder classifier (transformers' generic ``...ForSequenceClassification``
    with a ``score`` head), which pools the last non-pad token found from ``input_ids``."""
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(model, "score", None), nn.Module
    )


_MISSING = object()


def _report_mean_loss_to_trainer(model: nn.Module, undo: UndoStack) -> None:
    """Make a ``Trainer`` built while attached use the model's mean loss (``accepts_loss_kwargs =
    False`` on the instance, removed again by ``undo``).

    Trainer otherwise passes ``num_items_in_batch``, counted as the labels a causal LM predicts
    without a prompt (``labels[..., 1:]``); with a prompt the model also predicts the first real
    token from the last virtual one, so the summed loss divided by that count is ``L / (L - 1)``
    too large (PEFT's Trainer losses are). Trainer then averages micro-batch losses itself.
    """
    previous = vars(model).get("accepts_loss_kwargs", _MISSING)
    vars(model)["accepts_loss_kwargs"] = False

    def restore() -> None:
        if previous is _MISSING:
            vars(model).pop("accepts_loss_kwargs", None)
        else:
            vars(model)["accepts_loss_kwargs"] = previous

    undo.push(restore)


def _filled_cache(cache: object, keyword: str | None) -> Cache | None:
    """``cache`` (passed as ``keyword``) if it already holds positions, ``None`` if it is absent or empty.

    Raises:
        TypeError: ``cache`` is not a transformers ``Cache``.
    """
    if cache is None:
        return None
    if not isinstance(cache, Cache):
        raise TypeError(
            f"{keyword} of type {type(cache).__name__} is not accepted with prompt tuning; expected a "
            "transformers Cache (e.g. DynamicCache)"
        )
    return cache if cache.get_seq_length() else None


class PromptAttachment(Attachment):
    """A prompt-tuning or P-tuning adapter for one model; see :func:`attach_prompt`.

    Attributes:
        config: the resolved config (``token_dim`` and the informational fields read from the model).
        prompt_encoder: the module computing the ``(1, P, token_dim)`` prompt (float32, on the
            model's device): a ``PromptEmbedding`` or, for P-tuning, a ``PromptEncoder``.
        num_virtual_tokens: ``P``.
        saved_modules: the ``modules_to_save`` copies (plus the task head PEFT trains for
            ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS``), swapped in while attached.
    """

    def __init__(
        self, model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__(model, adapter_name)
        if not isinstance(config, (PromptTuningConfig, PromptEncoderConfig)):
            kind = f"{type(config).__module__}.{type(config).__qualname__}"
            raise TypeError(
                f"config must be a prefix_hooks PromptTuningConfig or PromptEncoderConfig, got {kind}; a PEFT config "
                "converts with PromptTuningConfig(**{k: v for k, v in peft_config.to_dict().items() "
                "if k in PromptTuningConfig.__dataclass_fields__})"
            )
        word_embeddings = token_embeddings(model)  # raises for models without token inputs
        root = _prompt_root(model)
        self.config = resolve_prompt_config(config, model)
        self.num_virtual_tokens = self.config.num_virtual_tokens
        self.prompt_encoder: PromptEmbedding | PromptEncoder = build_prompt_module(self.config, word_embeddings)
        self.prompt_encoder.to(compute_device(word_embeddings))
        self.prompt_encoder.requires_grad_(not self.config.inference_mode)
        self.saved_modules = SavedModules(
            model, config.modules_to_save or [], task_heads(config.task_type), adapter_name,
            trainable=not self.config.inference_mode,
        )
        self._encoder_decoder = root is not model
        self._prompt_root = _Root.of(root)
        self._decoder = _Root.of(model.get_decoder()) if self._encoder_decoder else None  # type: ignore[operator]
        self._labels_per_token = _labels_per_token(model, self.config)
        self._shifts_labels = self._labels_per_token and _predicts_next_token(model, self.config)
        self._pools_last_position = _pools_last_position(model) and not self._encoder_decoder
        self._child_name = f"prompt_hooks_{adapter_name}"
        # what the prompt root's pre-hook did to the forward running in this thread / task
        self._prepended: ContextVar[_Prepended | None] = ContextVar(f"prompt_hooks_{adapter_name}", default=None)
        # caches whose first P positions are this prompt's virtual tokens
        self._caches: weakref.WeakSet[Cache] = weakref.WeakSet()

    def adapter_modules(self) -> list[nn.Module]:
        return [self.prompt_encoder, *self.saved_modules.copies()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's outputs inside: the prompt is off in this thread (and async task), the
        modules to save run their originals model-wide (a wrapper has one switch)."""
        with self.saved_modules.disabled(), super().disabled():
            yield

    # --- attach -----------------------------------------------------------------------
    def _check_can_attach(self) -> None:
        for other in attachments_of(self.model):
            if isinstance(other, (PromptAttachment, PrefixAttachment)):
                kind = "prompt" if isinstance(other, PromptAttachment) else "prefix"
                raise RuntimeError(
                    f"the model already carries the {kind} adapter {other.adapter_name!r}; a prompt cannot be combined "
                    "with another prompt or a prefix. Detach it first"
                )
        if hasattr(self.model, self._child_name):
            raise ValueError(f"{type(self.model).__name__} already has an attribute {self._child_name!r}")
        self.saved_modules.check_can_attach()

    def _install(self, undo: UndoStack) -> None:
        undo.push(self._caches.clear)
        if isinstance(self.prompt_encoder, PromptEncoder):
            self.prompt_encoder.forget()  # steps taken while detached are not counted
        parameter_versions.acquire()
        undo.push(parameter_versions.release)
        freeze_parameters(self.model, undo)
        register_child(self.model, self._child_name, self.prompt_encoder, undo)
        self.saved_modules.install(undo)
        if self._shifts_labels and not self._encoder_decoder:
            _report_mean_loss_to_trainer(self.model, undo)
        root = self._prompt_root
        hook = root.module.register_forward_pre_hook(functools.partial(self._prepend, root), with_kwargs=True)
        undo.push(hook.remove)
        if not self._encoder_decoder:
            hook = self.model.register_forward_hook(self._finish, with_kwargs=True)
            undo.push(hook.remove)
        if self._decoder is not None:
            decoder = self._decoder
            hook = decoder.module.register_forward_pre_hook(
                functools.partial(self._extend_cross_mask, decoder), with_kwargs=True
            )
            undo.push(hook.remove)

    # --- per forward --------------------------------------------------------------------
    def prompt(self) -> torch.Tensor:
        """The virtual-token embeddings, ``(1, P, token_dim)`` float32 (a graph node while training).

        With ``num_transformer_submodules=2`` the module holds ``2P`` rows (PEFT's layout) and, as in
        PEFT's prompt tuning and P-tuning, the first ``P`` go in front of the encoder input.
        """
        return self.prompt_encoder.prompt(1)[:, : self.num_virtual_tokens]  # (1, P, token_dim)

    def _prepend(self, root: _Root, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._prepended.set(None)
        if not self.is_enabled:
            return None
        call = ForwardCall(root.params, args, dict(kwargs), module=module)
        input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        tokens = embeds if embeds is not None else input_ids
        if tokens is None:
            return None  # the model raises its own error
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        keyword, given_cache = (None, None) if self._encoder_decoder else find_cache(call)
        if getattr(given_cache, "is_compileable", False):
            raise ValueError(
                f"{keyword} of type {type(given_cache).__name__} is not supported with prompt tuning: a static "
                f"cache is sized for the real tokens, with no room for the {self.num_virtual_tokens} virtual tokens "
                "(and generate() gives it a 4-D mask without them); use the default DynamicCache"
            )
        if mask is not None and mask.dim() != 2:
            prepend_mask(mask, self.num_virtual_tokens)  # raises the error naming the shape
        if self._pools_last_position and mask is not None and not bool(mask[:, -1].all()):
            rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"rows {rows} of the batch are right-padded: {type(module).__name__} classifies the last non-pad "
                "token, which it finds from input_ids, and prompt tuning replaces input_ids by inputs_embeds, so "
                "these rows would be classified at a pad position (PEFT does so silently). Pad on the left "
                "(tokenizer.padding_side = 'left') or classify one text per call"
            )
        cache = _filled_cache(given_cache, keyword)
        if cache is not None:
            return self._continue(call, cache, keyword)
        num_virtual = self.num_virtual_tokens
        length = tokens.shape[1]
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)  # type: ignore[operator]  # (B, L, D), a swapped one too
            call.set("input_ids", None)
        call.set("inputs_embeds", prepend_prompt(self.prompt(), embeds))  # (B, P + L, D)
        if mask is not None:
            call.set("attention_mask", prepend_mask(mask, num_virtual))  # (B, P + L), 1 = attend
        if positions is not None:
            call.set("position_ids", prepend_positions(positions, num_virtual))  # (B, P + L)
        token_types = call.get("token_type_ids")
        if token_types is not None:
            call.set("token_type_ids", prepend_filler(token_types, num_virtual, 0))  # (B, P + L)
        labels = call.get("labels")
        if labels is not None and self._labels_per_token and not self._encoder_decoder:
            if labels.dim() != 2 or labels.shape[1] != length:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} are not accepted; expected one label per token, "
                    f"(batch, {length})"
                )
            call.set("labels", prepend_filler(labels, num_virtual, IGNORE_INDEX))  # (B, P + L)
        to_tuple = call.get("return_dict") is False
        if to_tuple:
            call.set("return_dict", True)
        self._prepended.set(_Prepended(length, to_tuple))
        return call.args, call.kwargs

    def _continue(self, call: ForwardCall, cache: Cache, keyword: str | None) -> Any:
        """A call continuing a cache: its virtual tokens must be this prompt's, already cached."""
        if cache not in self._caches:
            raise RuntimeError(
                f"{keyword} already holds {cache.get_seq_length()} positions that were not computed with the "
                f"prompt {self.adapter_name!r}; start from an empty cache (or none) so the virtual tokens are cached "
                "first"
            )
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        if mask is not None:
            call.set("attention_mask", prepend_mask(mask, self.num_virtual_tokens))  # (B, P + past + q)
        if positions is not None:
            call.set("position_ids", positions + self.num_virtual_tokens)  # (B, q)
        return call.args, call.kwargs

    def _finish(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        prepended = self._prepended.get()
        self._prepended.set(None)
        if prepended is None:
            return None
        cache = output_cache(output)
        if isinstance(cache, Cache):
            self._caches.add(cache)
        if not self.config.keep_virtual_outputs:
            output = trim_virtual_outputs(output, prepended.length)
        return output.to_tuple() if prepended.to_tuple else output

    def _extend_cross_mask(self, root: _Root, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Decoder pre-hook: the encoder output carries ``P`` virtual positions the 2-D
        ``encoder_attention_mask`` does not know about yet."""
        if not self.is_enabled:
            return None
        call = ForwardCall(root.params, args, dict(kwargs), module=module)
        states, mask = call.get("encoder_hidden_states"), call.get("encoder_attention_mask")
        if states is None or mask is None or mask.dim() != 2:
            return None
        if states.shape[1] != mask.shape[1] + self.num_virtual_tokens:
            return None
        call.set("encoder_attention_mask", prepend_mask(mask, self.num_virtual_tokens))  # (B, P + L)
        return call.args, call.kwargs


def attach_prompt(
    model: nn.Module,
    config: PromptTuningConfig | PromptEncoderConfig | str | os.PathLike[str],
    adapter_name: str = "default",
) -> PromptAttachment:
    """Build a prompt-tuning (``PromptTuningConfig``) or P-tuning (``PromptEncoderConfig``) adapter for
    ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Everything is validated and the prompt module is built here; nothing about ``model`` changes
    until the adapter is attached.

    Conventions while attached: the ``P`` virtual tokens sit at positions ``0..P-1`` in front of the
    real tokens (PEFT's layout); outputs have the caller's length (``keep_virtual_outputs=True``
    returns PEFT's ``P + L``); the loss is computed over ``P + L`` with ``-100`` labels on the
    virtual tokens (PEFT's). For an encoder-decoder the prompt goes in front of the encoder input
    and ``encoder_last_hidden_state`` keeps the virtual positions (the decoder attends to them);
    with ``num_transformer_submodules=2`` (PEFT's ``SEQ_2_SEQ_LM`` default) the module holds ``2P``
    rows and the encoder gets the first ``P``, as PEFT's prompt tuning and P-tuning do. A cache
    continued inside ``disabled()`` must not hold the virtual tokens; static caches are refused.
    A prompt cannot be combined with another prompt or a prefix; LoRA can join it.

    Args:
        model: a transformers text model with a token embedding.
        config: the prompt config; ``token_dim`` left ``None`` is read from the model.
            Or the path (``str`` / ``os.PathLike``) of a saved adapter folder, ours or
            PEFT's, or a hub id: the adapter is loaded frozen (``load_adapter(...,
            trainable=True)`` resumes training).
        adapter_name: a Python identifier naming the adapter.

    Returns:
        The (not yet attached) :class:`PromptAttachment`.

    Raises:
        TypeError: ``config`` is not a prompt config.
        ValueError: the model has no token inputs, is multimodal, or the config disagrees with it.

    Example:
        >>> with attach_prompt(model, PromptTuningConfig(num_virtual_tokens=20)) as handle:
        ...     trainer.train()
    """
    if isinstance(config, (str, os.PathLike)):  # a saved adapter folder or hub id
        from prefix_hooks.checkpoint.api import load_adapter_as

        return load_adapter_as(model, config, PromptAttachment, adapter_name)
    return PromptAttachment(model, config, adapter_name)
