"""Prompt tuning and P-tuning attached through hooks: ``attach_prompt``.

``P`` trainable virtual-token embeddings go in front of the input embeddings. On attach, in
this order (each step undone on detach, in reverse):

1. every base parameter is frozen (flags recorded);
2. the prompt module is registered under the model as ``prompt_hooks_<adapter>`` (so
   ``model.parameters()`` and Trainer's optimizer see it);
3. the ``forward`` of every module that takes the token inputs is shadowed by an instance
   attribute (:mod:`prefix_hooks.core.shadows`), so the prompt goes in however the model is invoked
   (``model(...)``, ``model.forward(...)``, ``model.model(...)`` / ``model.bert(...)`` and their
   ``forward``; sentence-transformers calls ``forward`` directly, which skips forward hooks).
   Those modules are the model and the modules under it that own the same token embedding
   (``model.model``, ``model.bert``, ``model.transformer``; OPT's ``model.model.decoder``), or the
   encoder stack of an encoder-decoder. The outermost one called does the work, once: it replaces
   ``input_ids`` by ``inputs_embeds = cat(prompt, embed(input_ids))`` and makes room for the
   virtual tokens in ``attention_mask`` (ones), ``position_ids`` (``0..P-1``, real ones ``+ P``),
   ``token_type_ids`` (zeros) and, on the model itself, per-token ``labels`` (-100); the ones it
   calls pass their call through. After the call it removes the virtual positions from per-token
   outputs (unless ``keep_virtual_outputs``; an encoder's output keeps them for the decoder) and
   remembers the cache objects that hold the virtual tokens;
4. for an encoder-decoder, the decoder stack's ``forward`` is shadowed too: it extends the
   cross-attention mask when the encoder output carries the virtual tokens.

Generation needs nothing special: ``generate()`` calls the model with the real tokens only.
The first call (no cache, or an empty one) prepends the prompt; a later call with a cache that
already holds the virtual tokens only extends the mask and shifts ``position_ids`` by ``P``.
Without a cache (``use_cache=False``) every call prepends.

The pieces: :mod:`.resolve` reads the model, :mod:`.modules` builds the prompt module, :mod:`.roots`
finds the modules to shadow, :mod:`.tasks` says what the task means for labels and loss,
:mod:`.calls` edits each call and its output, :mod:`.cache` hands out the cache.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from prefix_hooks.core import parameter_versions
from prefix_hooks.core.attachment import Hold, UndoStack, attachments_of, freeze_parameters, register_child
from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.devices import compute_device
from prefix_hooks.core.saved_modules import SavedModules, SavedModulesAttachment, task_heads
from prefix_hooks.core.shadows import shadow_forward
from prefix_hooks.core.transformers_compat import find_cache, output_cache
from prefix_hooks.prompt.cache import PromptCacheView, filled_cache, real_cache
from prefix_hooks.prompt.calls import (
    Prepended,
    ask_for_model_output,
    continue_call,
    extend_cross_attention_mask,
    finish_output,
    prepend_to_call,
    refuse_unsupported,
    take_answer_positions,
)
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig
from prefix_hooks.prompt.modules import PromptEmbedding, PromptEncoder, build_prompt_module
from prefix_hooks.prompt.resolve import resolve_prompt_config, token_embeddings
from prefix_hooks.prompt.roots import ENCODER, MODEL, Root, decoder_root, prompt_root, token_roots
from prefix_hooks.prompt.tasks import (
    labels_per_token,
    pools_last_position,
    predicts_next_token,
    report_mean_loss_to_trainer,
)


class PromptAttachment(SavedModulesAttachment):
    """A prompt-tuning or P-tuning adapter for one model; see :func:`attach_prompt`.

    Attributes:
        config: the resolved config (``token_dim`` and the informational fields read from the model).
        prompt_encoder: the module computing the ``(1, P, token_dim)`` prompt (float32, on the
            model's device): a ``PromptEmbedding`` or, for P-tuning, a ``PromptEncoder``.
        num_virtual_tokens: ``P``.
        saved_modules: the ``modules_to_save`` copies (plus the task head PEFT trains for
            ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS``), swapped in while attached.
    """

    virtual_tokens = "prompt"

    _transient_attributes = ("_caches",)

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
        root = prompt_root(model)
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
        self._token_roots = token_roots(model, root, word_embeddings)
        self._decoder = decoder_root(model, root)
        self._labels_per_token = labels_per_token(model, self.config)
        self._shifts_labels = self._labels_per_token and predicts_next_token(model, self.config)
        self._pools_last_position = pools_last_position(model) and not self._encoder_decoder
        self._child_name = f"prompt_hooks_{adapter_name}"
        # True while a token module's shadowed forward runs in this thread / task: the token
        # modules it calls (model -> model.model) pass their call through, so the prompt goes in once
        self._inside: ContextVar[bool | None] = ContextVar(f"prompt_hooks_{adapter_name}", default=None)
        # caches whose first P positions are this prompt's virtual tokens
        self._caches: weakref.WeakSet[Cache] = weakref.WeakSet()

    def _method_module(self) -> nn.Module:
        return self.prompt_encoder

    # --- attach -----------------------------------------------------------------------
    def _check_can_attach(self) -> None:
        for other in attachments_of(self.model):
            if other.virtual_tokens is not None:
                raise RuntimeError(
                    f"the model already carries the {other.virtual_tokens} adapter {other.adapter_name!r}; a prompt cannot be combined "
                    "with another prompt or a prefix. Detach it first"
                )
        if hasattr(self.model, self._child_name):
            raise ValueError(f"{type(self.model).__name__} already has an attribute {self._child_name!r}")
        self.saved_modules.check_can_attach()

    def _install(self, undo: UndoStack) -> None:
        undo.push(self._forget_caches)
        if isinstance(self.prompt_encoder, PromptEncoder):
            self.prompt_encoder.forget()  # steps taken while detached are not counted
        undo.push(Hold(parameter_versions.acquire, parameter_versions.release))
        freeze_parameters(self.model, undo)
        register_child(self.model, self._child_name, self.prompt_encoder, undo)
        self.saved_modules.install(undo)
        if self._shifts_labels and not self._encoder_decoder:
            report_mean_loss_to_trainer(self.model, undo)
        owner = f"the prompt {self.adapter_name!r}"
        for root in self._token_roots:
            shadow_forward(root.module, functools.partial(self._run_tokens, root), owner, undo)
        if self._decoder is not None:
            shadow_forward(self._decoder.module, functools.partial(self._run_decoder, self._decoder), owner, undo)

    def _forget_caches(self) -> None:
        self._caches.clear()

    def _reset_transient(self) -> None:
        self._caches = weakref.WeakSet()

    # --- per forward --------------------------------------------------------------------
    def prompt(self) -> torch.Tensor:
        """The virtual-token embeddings, ``(1, P, token_dim)`` float32 (a graph node while training).

        With ``num_transformer_submodules=2`` the module holds ``2P`` rows (PEFT's layout) and, as in
        PEFT's prompt tuning and P-tuning, the first ``P`` go in front of the encoder input.
        """
        return self.prompt_encoder.prompt(1)[:, : self.num_virtual_tokens]  # (1, P, token_dim)

    def _run_tokens(self, root: Root, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call of a token module's forward, however it was invoked: the outermost one puts the
        prompt in front, runs, and takes the virtual positions out of the output."""
        if not self.is_attached or not self.is_enabled or self._inside.get():
            return forward(*args, **kwargs)  # detached, disabled, or called by a token module already served
        args, kwargs, prepended = self._prepend(root, args, kwargs)
        self._inside.set(True)
        try:
            output = forward(*args, **kwargs)
        finally:
            self._inside.set(None)
        return output if prepended is None else self._finish(output, prepended)

    def _prepend(
        self, root: Root, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], Prepended | None]:
        """The call with the prompt in front, and what to undo in its output (``None``: nothing)."""
        call = ForwardCall(root.params, args, dict(kwargs), module=root.module)
        if call.get("inputs_embeds") is None and call.get("input_ids") is None:
            return args, kwargs, None  # the model raises its own error
        keyword, given_cache = (None, None) if root.role == ENCODER else find_cache(call)
        pools = root.role == MODEL and self._pools_last_position
        refuse_unsupported(call, keyword, given_cache, self.num_virtual_tokens, pools)
        cache = filled_cache(given_cache, keyword)
        if cache is not None:
            return call.args, call.kwargs, self._continue(call, cache, keyword)
        labels = self._labels_per_token and root.role == MODEL
        placement = self.config.virtual_token_placement
        length, offsets = prepend_to_call(call, root.module, self.prompt, self.num_virtual_tokens, placement, labels)
        if root.role == ENCODER:
            return call.args, call.kwargs, None  # its output keeps the virtual positions, for the decoder
        answer = None if self._encoder_decoder else take_answer_positions(call)
        return call.args, call.kwargs, Prepended(length, ask_for_model_output(call), offsets, answer)

    def _continue(self, call: ForwardCall, cache: Cache, keyword: str | None) -> Prepended:
        """A call continuing a cache: its virtual tokens must be this prompt's, already cached.
        The model's layers get the real cache (a returned :class:`PromptCacheView` is unwrapped)."""
        real = real_cache(cache)
        if real not in self._caches:
            raise RuntimeError(
                f"{keyword} already holds {real.get_seq_length()} positions that were not computed with the "
                f"prompt {self.adapter_name!r}; start from an empty cache (or none) so the virtual tokens are cached "
                "first"
            )
        if real is not cache:
            call.set(keyword or "cache", real)
        cached = real.get_seq_length() - self.num_virtual_tokens  # real tokens cached
        length = continue_call(call, cached, keyword, self.num_virtual_tokens, self.config.virtual_token_placement)
        return Prepended(length, ask_for_model_output(call))

    def _finish(self, output: Any, prepended: Prepended) -> Any:
        self._return_cache_view(output)
        return finish_output(output, prepended, self.config.keep_virtual_outputs)

    def _return_cache_view(self, output: Any) -> None:
        """Remember the cache ``output`` carries (it holds the virtual tokens) and hand it to the
        caller as a :class:`PromptCacheView`, whose lengths count the real tokens only."""
        cache = output_cache(output)
        if not isinstance(cache, Cache) or isinstance(cache, PromptCacheView):
            return
        self._caches.add(cache)
        key = next(key for key, value in output.items() if value is cache)
        output[key] = PromptCacheView(cache, self.num_virtual_tokens, self.adapter_name)

    def _run_decoder(self, root: Root, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call of the decoder stack's forward: the encoder output carries ``P`` virtual positions
        the 2-D ``encoder_attention_mask`` does not know about yet."""
        if not self.is_attached or not self.is_enabled:
            return forward(*args, **kwargs)
        call = ForwardCall(root.params, args, dict(kwargs), module=root.module)
        if not extend_cross_attention_mask(call, self.num_virtual_tokens, self.config.virtual_token_placement):
            return forward(*args, **kwargs)
        return forward(*call.args, **call.kwargs)


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
    return built_or_loaded(model, config, PromptAttachment, adapter_name)
