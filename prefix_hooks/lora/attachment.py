"""LoRA attached in place: ``attach_lora``.

On attach, in this order (each step undone on detach, in reverse):

1. the first LoRA adapter of the model freezes every base parameter and hooks the root
   for the ``adapter_names=[...]`` forward keyword (shared, see :mod:`prefix_hooks.core.swaps`);
2. every target module ``parent.child`` is replaced by a LoRA layer (made by the first
   adapter that targets it, shared by later ones) and this adapter's factors are lent to it;
3. every ``modules_to_save`` module is replaced by a :class:`ModulesToSaveWrapper` and this
   adapter's trainable copy is lent to it;
4. ``bias="all"`` / ``"lora_only"`` make those biases trainable;
5. the adapter joins the model's active adapters.

The adapter's own tensors (``lora_A``/``lora_B``, DoRA magnitudes, the copies) are built once, in the
constructor, and kept by the handle: detaching and attaching again resumes with the trained
values. After the last LoRA adapter is detached every original module object is back in its
place (same identity, same tensors), and the model is exactly as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import Attachment, UndoStack, attachments_of
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.config_fields import require_config
from prefix_hooks.core.disabled_blocks import DisabledBlocks
from prefix_hooks.core.merged_weights import check_no_other_merge
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.places import Place
from prefix_hooks.core.saved_modules import trainable_copy
from prefix_hooks.core.switch import Switch
from prefix_hooks.lora.activation import active_adapters, adapter_rows, set_active_adapters  # also here, as before
from prefix_hooks.lora.config import LoraConfig
from prefix_hooks.lora.layers import LoraLayer, wrap_module
from prefix_hooks.lora.merging import bake_adapter, unmerge_adapter
from prefix_hooks.lora.targets import select_modules_to_save, select_targets, task_modules_to_save

__all__ = ["LoraAttachment", "active_adapters", "adapter_rows", "attach_lora", "set_active_adapters"]


@dataclass(frozen=True)
class _Target:
    """A target module and the LoRA layer that owns this adapter's factors while detached."""

    place: Place
    home: LoraLayer  # wraps the original but is never in the model; holds only this adapter


class LoraAttachment(Attachment):
    """A LoRA adapter for one model; see :func:`attach_lora`.

    Each target's output becomes ``base(x) + B(A(dropout(x))) * scaling`` (see
    :mod:`prefix_hooks.lora.layers`); with ``use_dora`` each target also holds a trainable
    magnitude, ``<target>.lora_magnitude_vector.<adapter>.weight`` (see :mod:`prefix_hooks.lora.dora`).

    Attributes:
        config: the :class:`LoraConfig`.
        target_names: qualified names of the wrapped modules, in ``named_modules()`` order.
        modules_to_save_names: qualified names of the modules trained as full copies.
    """


    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        self.config = require_config(config, LoraConfig)
        with swaps.lock:
            view = swaps.clean_view(model)  # the model as it is without adapters: names and originals
            names = select_targets(view, config)
            saved = select_modules_to_save(view, config.modules_to_save or [], optional=task_modules_to_save(config))
            modules = swaps.originals(model, view, [*names, *saved], "a target or a module to save")
        trainable = not config.inference_mode
        self._switch = Switch()  # what disabled() turns off in one thread / task; the layers and wrappers hold it
        self._targets = [self._build_target(Place.of(name, modules[name])) for name in names]
        self._saved = [(Place.of(name, modules[name]), trainable_copy(modules[name], trainable)) for name in saved]
        self._biases: list[nn.Parameter] = []  # base biases trained while attached (bias="all"/"lora_only")
        for parameter in self.parameters():
            parameter.requires_grad_(trainable)
        self.target_names = names
        self.modules_to_save_names = saved
        self._merged = False
        self._disabled_blocks = DisabledBlocks(f"LoRA adapter {adapter_name!r}")  # guarded by swaps.lock

    def _make_layer(self, original: nn.Module) -> LoraLayer:
        """The layer standing in for a target module (AdaLoRA's attachment makes SVD layers)."""
        return wrap_module(original)

    def _build_target(self, place: Place) -> _Target:
        home = self._make_layer(place.original)
        home.switches[self.adapter_name] = self._switch
        rank, alpha = self.config.rank_and_alpha(place.name)
        try:
            home.add_adapter(
                self.adapter_name,
                r=rank,
                alpha=alpha,
                dropout=self.config.lora_dropout,
                use_rslora=self.config.use_rslora,
                init_lora_weights=self.config.init_lora_weights,  # type: ignore[arg-type]  # validated by LoraConfig
                use_dora=self.config.use_dora,
                unmerged_weight=self._unmerged_weight(place) if self.config.use_dora else None,
            )
        except ValueError as error:
            raise ValueError(f"{place.name!r}: {error}") from None
        return _Target(place, home)

    def _unmerged_weight(self, place: Place) -> torch.Tensor | None:
        """The original weight of ``place`` while attached LoRA adapters are merged into it (else None:
        the module's weight is the unmerged one); a DoRA magnitude starts from the unmerged weight."""
        with swaps.lock:
            state = swaps.state_of(self.model)
            swap = state.swaps.get(place.name) if state is not None else None
            layer = swap.replacement if swap is not None else None
            return layer.unmerged_weight() if isinstance(layer, LoraLayer) and layer.is_merged else None

    # --- parameters -------------------------------------------------------------------
    def adapter_modules(self) -> list[nn.Module]:
        """The containers of this adapter's factors (one per target and kind) and the modules-to-save copies."""
        containers = [
            container
            for target in self._targets
            for key, container in target.home.named_children()
            if key != "base_layer"
        ]
        return containers + [duplicate for _, duplicate in self._saved]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters named as in the attached model (and as PEFT names them, without ``base_model.model.``):
        ``<target>.lora_A.<adapter>.weight``, ``<module>.modules_to_save.<adapter>.<param>``."""
        for target in self._targets:
            for key, parameter in target.home.named_parameters():
                if not key.startswith("base_layer."):
                    yield f"{target.place.name}.{key}", parameter
        for place, duplicate in self._saved:
            for key, parameter in duplicate.named_parameters():
                yield f"{place.name}.modules_to_save.{self.adapter_name}.{key}", parameter

    def set_trainable(self, trainable: bool) -> None:
        """Set ``requires_grad`` of every adapter parameter (factors and modules-to-save copies)."""
        for parameter in self.parameters():
            parameter.requires_grad_(trainable)

    # --- attach / detach ----------------------------------------------------------------
    def _check_can_attach(self) -> None:
        with swaps.lock:
            state = swaps.state_of(self.model)
            if state is not None and self.adapter_name in state.adapters:
                raise RuntimeError(
                    f"a LoRA adapter named {self.adapter_name!r} is already attached to {type(self.model).__name__}; "
                    "give each adapter its own adapter_name"
                )
            for target in self._targets:
                swaps.parent_for(self.model, target.place, LoraLayer)
            for place, _ in self._saved:
                swaps.parent_for(self.model, place, ModulesToSaveWrapper)

    def _install(self, undo: UndoStack) -> None:
        with swaps.lock:
            self._install_locked(undo)

    def _install_locked(self, undo: UndoStack) -> None:
        name = self.adapter_name
        state = swaps.acquire_model(self.model, name, self, undo)
        for target in self._targets:
            place = target.place
            layer = state.acquire_swap(place, swaps.parent_for(self.model, place, LoraLayer), self._make_layer, name)
            undo.push(_bound(state.release_swap, place.name, name))
            assert isinstance(layer, LoraLayer)
            _lend(target.home, layer, name)
            undo.push(_bound(layer.delete_adapter, name))
            swaps.match_training(layer, place.original)
        for place, duplicate in self._saved:
            parent = swaps.parent_for(self.model, place, ModulesToSaveWrapper)
            wrapper = state.acquire_swap(place, parent, ModulesToSaveWrapper, name)
            undo.push(_bound(state.release_swap, place.name, name))
            assert isinstance(wrapper, ModulesToSaveWrapper)
            wrapper.add_copy(name, duplicate, switch=self._switch)
            undo.push(_bound(wrapper.remove_copy, name))
            swaps.match_training(wrapper, place.original)
        self._biases = self._trainable_biases()
        undo.push(self._biases.clear)
        state.make_trainable(self._biases, undo)
        state.active.append(name)

        def leave_active() -> None:
            with swaps.lock:
                if name in state.active:
                    state.active.remove(name)
                state.refresh()

        undo.push(leave_active)
        state.refresh()
        undo.push(self._unmerge_on_detach)

    def trained_base_parameters(self) -> list[nn.Parameter]:
        """The base biases this adapter trains (``bias="all"``/``"lora_only"``) while attached."""
        return list(self._biases)

    def _trainable_biases(self) -> list[nn.Parameter]:
        if self.config.bias == "lora_only":
            biases = [getattr(target.place.original, "bias", None) for target in self._targets]
            return [bias for bias in biases if isinstance(bias, nn.Parameter)]
        if self.config.bias == "all":
            # every bias but the adapters' own and those of modules replaced by trainable copies (as PEFT)
            state = swaps.state_of(self.model)
            assert state is not None  # called while installing
            saved = [swap.original for swap in state.swaps.values() if isinstance(swap.replacement, ModulesToSaveWrapper)]
            skip = {id(p) for a in [self, *attachments_of(self.model)] for p in a.parameters()}
            skip.update(id(p) for module in saved for p in module.parameters())
            return [
                parameter
                for key, parameter in self.model.named_parameters()
                if (key == "bias" or key.endswith(".bias")) and id(parameter) not in skip
            ]
        return []

    def _attached_after(self) -> list[Attachment]:
        # LoRA adapters share refcounted swaps, so they may leave in any order among
        # themselves; any other method attached later must still be detached first.
        return [other for other in super()._attached_after() if not isinstance(other, LoraAttachment)]

    def _layers(self) -> list[LoraLayer]:
        """The shared LoRA layers holding this adapter now (also while detach unwinds)."""
        state = swaps.state_of(self.model)
        if state is None or state.adapters.get(self.adapter_name) is not self:
            raise RuntimeError(f"LoRA adapter {self.adapter_name!r} is not attached")
        layers = [state.swaps[target.place.name].replacement for target in self._targets]
        return [layer for layer in layers if isinstance(layer, LoraLayer)]

    # --- switching ---------------------------------------------------------------------------
    def activate(self) -> None:
        """Make this adapter the only active LoRA adapter of the model (until another is activated).

        Raises:
            RuntimeError: not attached, or another adapter is merged.
        """
        if not self.is_attached:
            raise RuntimeError(f"LoRA adapter {self.adapter_name!r} is not attached")
        set_active_adapters(self.model, [self.adapter_name])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """A context in which this adapter adds nothing: the model computes what it would without it.

        The switch is local to the current thread (and async task), as a prefix's: forwards
        running elsewhere on the same model keep the adapter, its modules-to-save copies
        included. Per-row selection (``adapter_names``) still applies an adapter a row names.
        A merged adapter cannot be left out of one thread's forward, so the two exclude each
        other: this raises while the adapter is merged, and :meth:`merge` raises while a
        ``disabled()`` block is open in any thread.

        Raises:
            RuntimeError: the adapter is merged (call :meth:`unmerge` first).

        Example:
            >>> with handle.disabled():        # this thread only
            ...     base_logits = model(**batch).logits
        """
        with self._disabled_blocks.open(swaps.lock, lambda: self._merged), self._switch.off(), super().disabled():
            yield  # super(): is_enabled

    # --- merging -----------------------------------------------------------------------------
    @property
    def is_merged(self) -> bool:
        return self._merged

    def merge(self) -> None:
        """Fold this adapter into the base weights of its targets, in place, for faster inference.

        The module objects and ``state_dict()`` keys stay; the original weights are kept and
        come back bit-exactly on :meth:`unmerge` or detach. Modules-to-save copies keep running
        as copies. Per-row selection is refused while merged.

        Raises:
            RuntimeError: not attached, the adapter is not active, a ``disabled()`` block of it
                is open in this or another thread / task (a merged adapter always applies), or
                a target's weight holds another method's merged update
                (:mod:`prefix_hooks.core.merged_weights`).
        """
        with swaps.lock:
            layers = self._layers()
            state = swaps.state_of(self.model)
            assert state is not None
            if self._merged:
                return
            if self.adapter_name not in state.active:
                raise RuntimeError(
                    f"LoRA adapter {self.adapter_name!r} is not active (active: {state.active}); "
                    "a merged adapter always applies, so activate it before merging"
                )
            self._disabled_blocks.check_closed(self.is_enabled, "merge it")
            check_no_other_merge(self.model, {t.place.name: t.place.original for t in self._targets}, "LoRA")
            for layer in layers:
                layer.merge([self.adapter_name])
            self._merged = True

    def unmerge(self) -> None:
        """Take this adapter out of the base weights (no-op when it is not merged)."""
        with swaps.lock:
            if not self._merged:
                return
            unmerge_adapter(self._layers(), self.adapter_name)
            self._merged = False

    def _unmerge_on_detach(self) -> None:
        self.unmerge()

    def bake(self) -> None:
        """Fold this adapter into the model permanently and detach it.

        The one operation that changes the model on purpose: afterwards each target's
        weight holds ``W + scaling * B @ A`` (and each module to save holds its trained
        copy's values), while the module objects, classes and ``state_dict()`` keys are the
        original ones. Call it outside ``with handle:`` blocks (the handle ends detached).

        Raises:
            RuntimeError: attached more than once (nested), a ``disabled()`` block of it is open
                (in any thread / task), or not attached and attaching fails.
        """
        with self._lock:
            if self._depth > 1:
                raise RuntimeError(
                    f"bake() detaches LoRA adapter {self.adapter_name!r}, which is attached {self._depth} times "
                    "(nested blocks); call it where the adapter is attached once"
                )
            with swaps.lock:
                self._disabled_blocks.check_closed(self.is_enabled, "bake it")
            if not self.is_attached:
                self.attach()
            self.unmerge()
            with swaps.lock:
                bake_adapter(self._layers(), self.adapter_name)
                for place, duplicate in self._saved:
                    place.original.load_state_dict(duplicate.state_dict())  # copies into the original tensors
            self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return f"LoraAttachment({self.adapter_name!r}, {len(self._targets)} targets, {state})"


def _bound(function: Any, *args: Any) -> Any:
    """``function`` with ``args`` bound, as a zero-argument undo action."""

    def action() -> None:
        function(*args)

    return action


def _lend(home: LoraLayer, layer: LoraLayer, adapter_name: str) -> None:
    """Register ``adapter_name``'s factors (held by ``home``) in the shared ``layer`` (same objects).

    Every adapter-keyed container of ``home`` is copied by reference: the ``ModuleDict`` /
    ``ParameterDict`` children (``lora_A``, ``lora_B``, ``lora_dropout``, ``lora_embedding_*``)
    and the public plain dicts (``r``, ``lora_alpha``, ``scaling``). ``layer.delete_adapter``
    undoes it. The layer's active list is set by the model's shared state afterwards.
    """
    if adapter_name in layer.adapter_names:
        raise RuntimeError(f"the LoRA layer already holds an adapter named {adapter_name!r}")
    for key, container in home.named_children():
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in container:
            getattr(layer, key)[adapter_name] = container[adapter_name]
    for key, value in vars(home).items():
        if not key.startswith("_") and isinstance(value, dict) and adapter_name in value:
            getattr(layer, key)[adapter_name] = value[adapter_name]


def attach_lora(
    model: nn.Module, config: LoraConfig | str | os.PathLike[str], adapter_name: str = "default"
) -> LoraAttachment:
    """Build a LoRA adapter for ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Targets are selected and the adapter's factors (and modules-to-save copies) are built
    here; nothing about ``model`` changes until the adapter is attached. Several LoRA
    adapters with different names may be attached at once; they are all active unless
    :meth:`LoraAttachment.activate` / :func:`set_active_adapters` say otherwise, and may be
    detached in any order.

    Args:
        model: any ``nn.Module`` (a transformers model for ``target_modules=None``).
        config: the :class:`LoraConfig`; or a folder or hub id where a LoRA adapter was saved
            (ours or PEFT's), loaded frozen: ``load_adapter(..., trainable=True)`` resumes training
            (see :func:`~prefix_hooks.core.checkpoints.built_or_loaded`).
        adapter_name: a Python identifier naming the adapter; its key in the shared layers.

    Returns:
        The (not yet attached) :class:`LoraAttachment`.

    Raises:
        TypeError: ``config`` is not a :class:`LoraConfig`.
        ValueError: the targets or modules to save match nothing, or a target LoRA cannot
            wrap (:data:`~prefix_hooks.lora.targets.SUPPORTED_MODULE_TYPES`).

    Example:
        >>> with attach_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])) as handle:
        ...     trainer.train()
        ...     handle.merge()            # fast inference inside the block
        >>> # here `model` is exactly the model it was before
    """
    return built_or_loaded(model, config, LoraAttachment, adapter_name)
