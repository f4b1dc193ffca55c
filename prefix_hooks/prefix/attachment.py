"""Prefix tuning attached through hooks: ``attach_prefix``.

On attach, in this order (each step undone on detach, in reverse):

1. every base parameter is frozen (flags recorded);
2. the :class:`PrefixEncoder` is registered under the model (``model.parameters()``
   yields it, so an optimizer built by Trainer trains it);
3. the attention interposer is installed (shared by all attached models);
4. the base model's ``forward`` (each stack's, for an encoder-decoder) is shadowed by an
   instance attribute (:mod:`prefix_hooks.core.shadows`) that computes the prefix once per forward,
   hands it to the attention layers through ``**kwargs``, offsets ``position_ids`` and checks
   that the attention layers took it. An instance ``forward`` runs however the model is
   invoked: ``model(...)``, ``model.forward(...)``, ``model.model(...)``,
   ``model.model.forward(...)`` (sentence-transformers calls ``forward`` directly), where a
   forward hook would run only in ``__call__``.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_hooks.core import parameter_versions
from prefix_hooks.core.attachment import Hold, UndoStack, attachments_of, freeze_parameters, register_child
from prefix_hooks.core.calls import ForwardCall
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.devices import compute_device
from prefix_hooks.core.saved_modules import SavedModules, SavedModulesAttachment, task_heads
from prefix_hooks.core.shadows import shadow_forward
from prefix_hooks.core.transformers_compat import require_known_cache_parameter
from prefix_hooks.prefix import interposer as attention_interposer
from prefix_hooks.prefix.architecture import ArchitectureAdapter, AttentionSite, ModelDims, adapter_for
from prefix_hooks.prefix.config import PrefixTuningConfig, resolve_prefix_config
from prefix_hooks.prefix.encoder import PrefixEncoder
from prefix_hooks.prefix.prefixed_cache import PrefixedStorage, unwrap_output_cache, wrap_cache
from prefix_hooks.prefix.splice import SUPPORTED_IMPLEMENTATIONS, Backend, backend_of
from prefix_hooks.prefix.state import PrefixForwardState
from prefix_hooks.prefix.views import LayerViews


@dataclass(frozen=True)
class _Root:
    """A module whose (shadowed) forward builds the prefix state, with its parameter names and offset."""

    module: nn.Module
    params: list[str]
    offset: int


def _cache_slots(family: ArchitectureAdapter, sites: list[AttentionSite]) -> dict[int, int]:
    """Cache layer index -> prefix slot for the self-attention sites the interposer alone serves, when
    their ``layer_idx`` attributes identify their cache layers one to one; else empty (no
    :class:`PrefixedCache`). A site served by a cache view of its family (inline attention) keeps
    the prefix in the cache's storage through that view instead."""
    slots: dict[int, int] = {}
    for site in sites:
        if not family.interposer_serves(site):
            continue
        layer_idx = getattr(site.module, "layer_idx", None)
        if site.role != "self" or not isinstance(layer_idx, int) or slots.get(layer_idx, site.layer) != site.layer:
            return {}
        slots[layer_idx] = site.layer
    return slots


def _model_dims(
    family: ArchitectureAdapter, model: nn.Module, config: PrefixTuningConfig
) -> tuple[ModelDims, list[AttentionSite]]:
    sites = family.attention_sites(model, config)
    if not sites:
        raise ValueError(f"found no attention modules {family.attention_classes} in {type(model).__name__}")
    slots = sorted({site.layer for site in sites})
    num_slots = family.num_slots(model, config, sites)
    if not set(slots) <= set(range(num_slots)):
        raise ValueError(f"{family.name}: prefix slots {slots} are not within 0..{num_slots - 1}")
    modules = [site.module for site in sites]
    if len(set(map(id, modules))) != len(modules):
        raise ValueError(f"{family.name}: an attention module is listed twice")
    shapes = {(site.kv_heads, site.head_dim) for site in sites}
    if len(shapes) != 1:
        raise ValueError(
            f"{family.name}: attention layers produce different key shapes {sorted(shapes)} (kv_heads, head_dim); "
            "a single prefix width cannot serve them"
        )
    ((kv_heads, head_dim),) = shapes
    dims = ModelDims(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        num_layers=num_slots,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_transformer_submodules=family.num_transformer_submodules,
    )
    return dims, sites


class PrefixAttachment(SavedModulesAttachment):
    """A prefix-tuning adapter for one model; see :func:`attach_prefix`.

    Attributes:
        config: the resolved config (every dimension filled from the model).
        encoder: the :class:`PrefixEncoder`, float32, on the model's device.
        saved_modules: the ``modules_to_save`` copies (plus the task head PEFT trains for
            ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS``), swapped in while attached.
    """

    virtual_tokens = "prefix"

    _transient_attributes = ("_kv_memo", "_views", "_storage")

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        if not isinstance(config, PrefixTuningConfig):
            kind = f"{type(config).__module__}.{type(config).__qualname__}"
            raise TypeError(
                f"config must be a prefix_hooks.PrefixTuningConfig, got {kind}; a PEFT config converts with "
                "prefix_hooks.PrefixTuningConfig(**{k: v for k, v in peft_config.to_dict().items() "
                "if k in prefix_hooks.PrefixTuningConfig.__dataclass_fields__})"
            )
        self.family = adapter_for(model)
        reason = self.family.unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self._check_implementation()
        dims, self._sites = _model_dims(self.family, model, config)
        self._layer_of = {site.module: site.layer for site in self._sites}
        self._cache_slots = _cache_slots(self.family, self._sites)
        self.config = resolve_prefix_config(config, dims)
        self._roots = [self._root(module) for module in self.family.roots(model, self._sites)]
        # the state of the forward running in this thread / task (or of the last one, which a
        # gradient-checkpointing recomputation during backward needs); read by per-site hooks
        self._current: ContextVar[PrefixForwardState | None] = ContextVar(f"prefix_hooks_{adapter_name}", default=None)
        self.encoder = PrefixEncoder(self.config).to(compute_device(model))
        self.encoder.requires_grad_(not self.config.inference_mode)
        self.saved_modules = SavedModules(
            model, config.modules_to_save or [], task_heads(config.task_type), adapter_name,
            trainable=not self.config.inference_mode,
        )
        self._child_name = f"prefix_hooks_{adapter_name}"
        self._dims = dims
        self._kv_memo: tuple[torch.Tensor, torch.Tensor] | None = None  # (encoder output, its layer view)
        self._views = LayerViews()
        self._storage = PrefixedStorage()  # cache layers holding this prefix in front (decode)

    def _root(self, module: nn.Module) -> _Root:
        offset = (
            self.config.position_offset
            if self.config.position_offset is not None
            else self.family.default_position_offset(module, self.config.num_virtual_tokens)
        )
        offset_error = self.family.position_offset_error(module, offset)
        if offset_error is not None:
            raise ValueError(offset_error)
        require_known_cache_parameter(module)
        return _Root(module, list(inspect.signature(module.forward).parameters), offset)

    def _method_module(self) -> nn.Module:
        return self.encoder

    def _check_implementation(self) -> None:
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if backend_of(implementation) is Backend.UNSUPPORTED:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported with a prefix; "
                f"use one of {', '.join(SUPPORTED_IMPLEMENTATIONS)}"
            )

    def _check_can_attach(self) -> None:
        for other in attachments_of(self.model):
            if other.virtual_tokens == "prefix":
                raise RuntimeError(
                    f"the model already carries the prefix {other.adapter_name!r}; prefixes do not stack. "
                    "Detach it first, or use one PrefixTuningConfig with more num_virtual_tokens"
                )
            if other.virtual_tokens is not None:
                raise RuntimeError(
                    f"the model already carries the {other.virtual_tokens} adapter {other.adapter_name!r}; a prefix "
                    "cannot be combined with prompt tuning or P-tuning. Detach it first"
                )
        if hasattr(self.model, self._child_name):
            raise ValueError(f"{type(self.model).__name__} already has an attribute {self._child_name!r}")
        self._check_implementation()
        self.saved_modules.check_can_attach()

    def _install(self, undo: UndoStack) -> None:
        self._forget_views()  # steps taken while detached are not counted
        undo.push(self._forget_views)
        undo.push(self._forget_current)  # run last: the detaching thread's context keeps no state (nor model)
        undo.push(Hold(parameter_versions.acquire, parameter_versions.release))
        freeze_parameters(self.model, undo)
        register_child(self.model, self._child_name, self.encoder, undo)
        self.saved_modules.install(undo)
        undo.push(Hold(attention_interposer.acquire, attention_interposer.release))
        owner = f"the prefix {self.adapter_name!r}"
        for root in self._roots:
            shadow_forward(root.module, functools.partial(self._run_root, root), owner, undo)
        self.family.install_site_hooks(self._sites, self._current_state, undo)

    def _forget_views(self) -> None:
        self._kv_memo = None
        self._views.clear()
        self._storage.clear()
        self.encoder.forget()

    def _reset_transient(self) -> None:
        self._kv_memo = None
        self._views = LayerViews()
        self._storage = PrefixedStorage()

    def _forget_current(self) -> None:
        self._current.set(None)

    def _current_state(self) -> PrefixForwardState | None:
        return self._current.get() if self.is_enabled else None

    # --- per forward --------------------------------------------------------------
    def layer_prefixes(self) -> torch.Tensor:
        """Every layer's prefix, computed once: ``(L, 2, kv_heads, P, D)`` (a view of the encoder output)."""
        dims = self._dims
        flat = self.encoder.prefix()  # (P, L*2*kv_heads*D)
        recording = torch.is_grad_enabled() and flat.requires_grad
        if not recording and self._kv_memo is not None and self._kv_memo[0] is flat:
            return self._kv_memo[1]  # the same tensor as last time: layer views stay valid
        per_layer = flat.view(self.config.num_virtual_tokens, dims.num_layers, 2, dims.kv_heads, dims.head_dim)
        kv = per_layer.permute(1, 2, 3, 0, 4)  # (L, 2, kv_heads, P, D)
        self._kv_memo = None if recording else (flat, kv)
        return kv

    def _run_root(self, root: _Root, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call of ``root``'s forward, however it was invoked: build this forward's prefix state,
        pass it down through ``**kwargs``, shift the positions, run, check that the layers took it."""
        if not self.is_attached or not self.is_enabled or attention_interposer.STATE_KWARG in kwargs:
            return forward(*args, **kwargs)  # detached, disabled, or a stack inside a root already served
        self._check_implementation()
        state = PrefixForwardState(
            self._layer_of, self.layer_prefixes(), self.layer_prefixes, position_offset=root.offset, views=self._views,
            storage=self._storage, cache_slots=self._cache_slots,
        )
        self._current.set(state)
        call = ForwardCall(root.params, args, dict(kwargs), module=root.module)
        call.kwargs[attention_interposer.STATE_KWARG] = state
        if root.offset:
            self.family.offset_positions(call, root.offset)
        proxy = wrap_cache(call, state.storage, state.cache_prefix, state.note_prefixed) if self._cache_slots else None
        try:
            output = forward(*call.args, **call.kwargs)
        finally:
            if proxy is not None:
                proxy.close()
            state.prefixed.clear()  # the state outlives the forward: hold no cache tensors
        self._check_spliced(root.module, state)
        return output if proxy is None else unwrap_output_cache(output, proxy)

    def _check_spliced(self, module: nn.Module, state: PrefixForwardState) -> None:
        if state.spliced == 0 and self._layer_of:
            raise RuntimeError(
                f"the prefix reached none of the {len(self._layer_of)} attention layers during "
                f"{type(module).__name__}.forward; the {self.family.name!r} family adapter does not match "
                "this model (its base_model must pass **kwargs down to the attention function)"
            )


def attach_prefix(
    model: nn.Module, config: PrefixTuningConfig | str | os.PathLike[str], adapter_name: str = "default"
) -> PrefixAttachment:
    """Build a prefix-tuning adapter for ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Everything is validated and the encoder is built here; nothing about ``model`` is
    changed until the adapter is attached.

    Args:
        model: a transformers model of a supported family (see
            :func:`prefix_hooks.families.supported`).
        config: the prefix config; dimensions left ``None`` are read from the model.
            Or the path (``str`` / ``os.PathLike``) of a saved adapter folder, ours or
            PEFT's, or a hub id: the adapter is loaded frozen (``load_adapter(...,
            trainable=True)`` resumes training).
        adapter_name: a Python identifier naming the adapter.

    Returns:
        The (not yet attached) :class:`PrefixAttachment`.

    Raises:
        ValueError: the config disagrees with the model, or the model is not supported.

    Example:
        >>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=20)) as handle:
        ...     trainer.train()
    """
    return built_or_loaded(model, config, PrefixAttachment, adapter_name)
