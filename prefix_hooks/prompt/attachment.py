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
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from prefix_hooks.core import parameter_versions
from prefix_hooks.core.attachment import Attachment, Hold, UndoStack, attachments_of, freeze_parameters, register_child
from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.config import TaskType
from prefix_hooks.core.devices import compute_device
from prefix_hooks.core.saved_modules import SavedModules, task_heads
from prefix_hooks.core.shadows import shadow_attribute, shadow_forward
from prefix_hooks.core.transformers_compat import find_cache, output_cache, require_known_cache_parameter
from prefix_hooks.prompt.cache import PromptCacheView, real_cache
from prefix_hooks.prompt.config import PromptEncoderConfig, PromptTuningConfig
from prefix_hooks.prompt.inputs import (
    IGNORE_INDEX,
    prepend_filler,
    prepend_mask,
    prepend_positions,
    prepend_prompt,
    question_answering_loss,
    trim_virtual_outputs,
    virtual_offsets,
)
from prefix_hooks.prompt.modules import (
    PromptEmbedding,
    PromptEncoder,
    build_prompt_module,
    resolve_prompt_config,
    token_embeddings,
)

_PER_TOKEN_TASKS = frozenset({TaskType.CAUSAL_LM, TaskType.TOKEN_CLS})
_PER_TOKEN_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForTokenClassification", "ForMaskedLM")


_MODEL, _BASE, _ENCODER, _DECODER = "model", "base", "encoder", "decoder"


@dataclass(frozen=True)
class _Root:
    """A module whose ``forward`` is shadowed, with its ``forward`` parameter names and its role:
    ``"model"`` (the model itself: labels too), ``"base"`` (a module under it that embeds the same
    tokens), ``"encoder"`` (an encoder-decoder's encoder stack), ``"decoder"`` (its decoder stack)."""

    module: nn.Module
    params: list[str]
    role: str

    @classmethod
    def of(cls, module: nn.Module, role: str) -> _Root:
        return cls(module, list(inspect.signature(module.forward).parameters), role)


@dataclass(frozen=True)
class _Prepended:
    """What a token module's shadowed forward did to its call: ``length`` real tokens got the
    prompt at ``offsets`` (``None``: in front; see ``prompt.inputs``), or continued a cache
    holding it; ``to_tuple``: the caller asked for a tuple (``return_dict=False``); ``answer``:
    the start/end positions whose loss is computed on the real positions' logits."""

    length: int
    to_tuple: bool
    offsets: torch.Tensor | None = None
    answer: tuple[torch.Tensor, torch.Tensor] | None = None


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


def _base_stacks(model: nn.Module, embedding: nn.Module) -> list[nn.Module]:
    """The modules under ``model`` that own its token ``embedding`` and take the token inputs
    (``input_ids``, ``inputs_embeds``, ``attention_mask``): ``model.model``, ``model.bert``,
    ``model.transformer``, OPT's ``model.model.decoder``, outermost first."""
    found = []
    for module in model.modules():
        get_input_embeddings = getattr(module, "get_input_embeddings", None)
        if module is model or not callable(get_input_embeddings):
            continue
        try:
            owned = get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        params = inspect.signature(module.forward).parameters
        if owned is embedding and all(name in params for name in ("input_ids", "inputs_embeds", "attention_mask")):
            found.append(module)
    return found


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


def _report_mean_loss_to_trainer(model: nn.Module, undo: UndoStack) -> None:
    """Make a ``Trainer`` built while attached use the model's mean loss (``accepts_loss_kwargs =
    False`` on the instance, removed again by ``undo``).

    Trainer otherwise passes ``num_items_in_batch``, counted as the labels a causal LM predicts
    without a prompt (``labels[..., 1:]``); with a prompt the model also predicts the first real
    token from the last virtual one, so the summed loss divided by that count is ``L / (L - 1)``
    too large (PEFT's Trainer losses are). Trainer then averages micro-batch losses itself.
    """
    shadow_attribute(model, "accepts_loss_kwargs", False, undo)


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
        if self._encoder_decoder:
            self._token_roots = [_Root.of(root, _ENCODER)]
        else:
            bases = _base_stacks(model, word_embeddings)
            self._token_roots = [_Root.of(model, _MODEL), *(_Root.of(base, _BASE) for base in bases)]
        self._decoder = _Root.of(model.get_decoder(), _DECODER) if self._encoder_decoder else None  # type: ignore[operator]
        self._labels_per_token = _labels_per_token(model, self.config)
        self._shifts_labels = self._labels_per_token and _predicts_next_token(model, self.config)
        self._pools_last_position = _pools_last_position(model) and not self._encoder_decoder
        self._child_name = f"prompt_hooks_{adapter_name}"
        # True while a token module's shadowed forward runs in this thread / task: the token
        # modules it calls (model -> model.model) pass their call through, so the prompt goes in once
        self._inside: ContextVar[bool | None] = ContextVar(f"prompt_hooks_{adapter_name}", default=None)
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
            _report_mean_loss_to_trainer(self.model, undo)
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

    def _run_tokens(self, root: _Root, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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
        self, root: _Root, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], _Prepended | None]:
        """The call with the prompt in front, and what to undo in its output (``None``: nothing)."""
        module = root.module
        call = ForwardCall(root.params, args, dict(kwargs), module=module)
        input_ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        tokens = embeds if embeds is not None else input_ids
        if tokens is None:
            return args, kwargs, None  # the model raises its own error
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        keyword, given_cache = (None, None) if root.role == _ENCODER else find_cache(call)
        if getattr(given_cache, "is_compileable", False):
            raise ValueError(
                f"{keyword} of type {type(given_cache).__name__} is not supported with prompt tuning: a static "
                f"cache is sized for the real tokens, with no room for the {self.num_virtual_tokens} virtual tokens "
                "(and generate() gives it a 4-D mask without them); use the default DynamicCache"
            )
        if mask is not None and mask.dim() != 2:
            prepend_mask(mask, self.num_virtual_tokens)  # raises the error naming the shape
        if root.role == _MODEL and self._pools_last_position and mask is not None and not bool(mask[:, -1].all()):
            rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"rows {rows} of the batch are right-padded: {type(module).__name__} classifies the last non-pad "
                "token, which it finds from input_ids, and prompt tuning replaces input_ids by inputs_embeds, so "
                "these rows would be classified at a pad position (PEFT does so silently). Pad on the left "
                "(tokenizer.padding_side = 'left') or classify one text per call"
            )
        cache = _filled_cache(given_cache, keyword)
        if cache is not None:
            prepended = self._continue(call, cache, keyword)
            return call.args, call.kwargs, prepended
        num_virtual = self.num_virtual_tokens
        length = tokens.shape[1]
        offsets = virtual_offsets(mask, self.config.virtual_token_placement)  # (B,) or None: all in front
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)  # type: ignore[operator]  # (B, L, D), a swapped one too
            call.set("input_ids", None)
        call.set("inputs_embeds", prepend_prompt(self.prompt(), embeds, offsets))  # (B, P + L, D)
        if mask is not None:
            call.set("attention_mask", prepend_mask(mask, num_virtual, offsets))  # (B, P + L), 1 = attend
        if positions is not None:
            call.set("position_ids", prepend_positions(positions, num_virtual, offsets))  # (B, P + L)
        token_types = call.get("token_type_ids")
        if token_types is not None:
            call.set("token_type_ids", prepend_filler(token_types, num_virtual, 0, offsets))  # (B, P + L)
        labels = call.get("labels")
        if labels is not None and self._labels_per_token and root.role == _MODEL:
            if labels.dim() != 2 or labels.shape[1] != length:
                raise ValueError(
                    f"labels of shape {tuple(labels.shape)} are not accepted; expected one label per token, "
                    f"(batch, {length})"
                )
            call.set("labels", prepend_filler(labels, num_virtual, IGNORE_INDEX, offsets))  # (B, P + L)
        if root.role == _ENCODER:
            return call.args, call.kwargs, None  # its output keeps the virtual positions, for the decoder
        answer = self._take_answer_positions(call)
        return call.args, call.kwargs, _Prepended(length, self._return_dict(call), offsets, answer)

    @staticmethod
    def _return_dict(call: ForwardCall) -> bool:
        """Make the call return a ``ModelOutput``; whether the caller asked for a tuple."""
        to_tuple = call.get("return_dict") is False
        if to_tuple:
            call.set("return_dict", True)
        return to_tuple

    def _take_answer_positions(self, call: ForwardCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A question-answering head's ``start_positions`` / ``end_positions``, taken out of the call:
        they index the real tokens, so their loss is computed on the real positions' logits."""
        if self._encoder_decoder or "start_positions" not in call.params:
            return None
        start, end = call.get("start_positions"), call.get("end_positions")
        if start is None or end is None:
            return None
        call.set("start_positions", None)
        call.set("end_positions", None)
        return start, end

    def _continue(self, call: ForwardCall, cache: Cache, keyword: str | None) -> _Prepended:
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
        mask, positions = call.get("attention_mask"), call.get("position_ids")
        tokens = call.get("inputs_embeds") if call.get("inputs_embeds") is not None else call.get("input_ids")
        cached = real.get_seq_length() - self.num_virtual_tokens  # real tokens cached
        # generate() slices its inputs by the cache's length: a cache counting the virtual tokens makes it
        # feed cached tokens again (the mask then is too short; without padding it drops the mask, and the
        # first new position falls inside the cache)
        too_short = mask is not None and tokens is not None and mask.shape[1] != cached + tokens.shape[1]
        if too_short or (mask is None and positions is not None and int(positions[..., 0].max()) < cached):
            raise ValueError(
                f"{keyword} holds {cached} real tokens (plus {self.num_virtual_tokens} virtual ones) but the call's "
                "attention_mask / position_ids do not continue after them; continue from the cache the model "
                "returned (out.cache, which counts real tokens only), with a mask over the cached and the new tokens"
            )
        if mask is not None:
            offsets = virtual_offsets(mask, self.config.virtual_token_placement)  # a row's leading pads stay
            call.set("attention_mask", prepend_mask(mask, self.num_virtual_tokens, offsets))  # (B, P + past + q)
        if positions is not None:
            call.set("position_ids", positions + self.num_virtual_tokens)  # (B, q)
        length = tokens.shape[1] if tokens is not None else 0
        return _Prepended(length, self._return_dict(call))

    def _finish(self, output: Any, prepended: _Prepended) -> Any:
        self._return_cache_view(output)
        if prepended.answer is not None:
            output = question_answering_loss(output, *prepended.answer, prepended.length, prepended.offsets)
        if not self.config.keep_virtual_outputs:
            output = trim_virtual_outputs(output, prepended.length, prepended.offsets)
        return output.to_tuple() if prepended.to_tuple else output

    def _return_cache_view(self, output: Any) -> None:
        """Remember the cache ``output`` carries (it holds the virtual tokens) and hand it to the
        caller as a :class:`PromptCacheView`, whose lengths count the real tokens only."""
        cache = output_cache(output)
        if not isinstance(cache, Cache) or isinstance(cache, PromptCacheView):
            return
        self._caches.add(cache)
        key = next(key for key, value in output.items() if value is cache)
        output[key] = PromptCacheView(cache, self.num_virtual_tokens, self.adapter_name)

    def _run_decoder(self, root: _Root, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call of the decoder stack's forward: the encoder output carries ``P`` virtual positions
        the 2-D ``encoder_attention_mask`` does not know about yet."""
        if not self.is_attached or not self.is_enabled:
            return forward(*args, **kwargs)
        call = ForwardCall(root.params, args, dict(kwargs), module=root.module)
        states, mask = call.get("encoder_hidden_states"), call.get("encoder_attention_mask")
        if states is None or mask is None or mask.dim() != 2 or states.shape[1] != mask.shape[1] + self.num_virtual_tokens:
            return forward(*args, **kwargs)
        offsets = virtual_offsets(mask, self.config.virtual_token_placement)  # as the encoder placed them
        call.set("encoder_attention_mask", prepend_mask(mask, self.num_virtual_tokens, offsets))  # (B, P + L)
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
