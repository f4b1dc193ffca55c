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

The adapter's own tensors (``lora_A``/``lora_B``, the copies) are built once, in the
constructor, and kept by the handle: detaching and attaching again resumes with the trained
values. After the last LoRA adapter is detached every original module object is back in its
place (same identity, same tensors), and the model is exactly as before.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import Attachment, UndoStack, attachments_of
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.disabled_blocks import DisabledBlocks
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.rows import adapter_rows_context
from prefix_hooks.core.switch import Switch
from prefix_hooks.lora.config import LoraConfig
from prefix_hooks.lora.layers import LoraLayer, wrap_module
from prefix_hooks.lora.targets import select_modules_to_save, select_targets, task_modules_to_save


@dataclass(frozen=True)
class _Place:
    """Where a module sits: ``model.<parent_path>._modules[child_name]``, and the module itself."""

    name: str
    parent_path: tuple[str, ...]
    child_name: str
    original: nn.Module

    @classmethod
    def of(cls, name: str, original: nn.Module) -> _Place:
        *parent, child = name.split(".")
        return cls(name, tuple(parent), child, original)


@dataclass(frozen=True)
class _Target:
    """A target module and the LoRA layer that owns this adapter's factors while detached."""

    place: _Place
    home: LoraLayer  # wraps the original but is never in the model; holds only this adapter


class LoraAttachment(Attachment):
    """A LoRA adapter for one model; see :func:`attach_lora`.

    Each target's output becomes ``base(x) + B(A(dropout(x))) * scaling`` (see
    :mod:`prefix_hooks.lora.layers`).

    Attributes:
        config: the :class:`LoraConfig`.
        target_names: qualified names of the wrapped modules, in ``named_modules()`` order.
        modules_to_save_names: qualified names of the modules trained as full copies.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        if not isinstance(config, LoraConfig):
            kind = f"{type(config).__module__}.{type(config).__qualname__}"
            raise TypeError(
                f"config must be a prefix_hooks.LoraConfig, got {kind}; a PEFT config converts with "
                "prefix_hooks.LoraConfig(**{k: v for k, v in peft_config.to_dict().items() "
                "if k in prefix_hooks.LoraConfig.__dataclass_fields__})"
            )
        self.config = config
        with swaps.lock:
            view = swaps.clean_view(model)  # the model as it is without adapters: names and originals
            names = select_targets(view, config)
            saved = select_modules_to_save(view, config.modules_to_save or [], optional=task_modules_to_save(config))
            modules = dict(view.named_modules())
            real = {id(m) for m in model.modules()}
            state = swaps.state_of(model)
            real.update(id(swap.original) for swap in (state.swaps.values() if state else ()))
            for name in [*names, *saved]:
                if id(modules[name]) not in real:  # a stand-in of the view: a swap lies inside it
                    raise ValueError(
                        f"{name!r} contains modules that attached LoRA adapters replaced; it cannot be a target or "
                        "a module to save while they are attached"
                    )
        trainable = not config.inference_mode
        self._switch = Switch()  # what disabled() turns off in one thread / task; the layers and wrappers hold it
        self._targets = [self._build_target(_Place.of(name, modules[name])) for name in names]
        self._saved: list[tuple[_Place, nn.Module]] = []
        self._biases: list[nn.Parameter] = []  # base biases trained while attached (bias="all"/"lora_only")
        for name in saved:
            original = modules[name]
            duplicate = copy.deepcopy(original)
            duplicate.requires_grad_(trainable)
            self._saved.append((_Place.of(name, original), duplicate))
        for parameter in self.parameters():
            parameter.requires_grad_(trainable)
        self.target_names = names
        self.modules_to_save_names = saved
        self._merged = False
        self._disabled_blocks = DisabledBlocks(f"LoRA adapter {adapter_name!r}")  # guarded by swaps.lock

    def _build_target(self, place: _Place) -> _Target:
        home = wrap_module(place.original)
        home.switches[self.adapter_name] = self._switch
        rank, alpha = self.config.rank_and_alpha(place.name)
        home.add_adapter(
            self.adapter_name,
            r=rank,
            alpha=alpha,
            dropout=self.config.lora_dropout,
            use_rslora=self.config.use_rslora,
            init_lora_weights=self.config.init_lora_weights,  # type: ignore[arg-type]  # validated by LoraConfig
        )
        return _Target(place, home)

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
                self._parent_of(target.place, LoraLayer)
            for place, _ in self._saved:
                self._parent_of(place, ModulesToSaveWrapper)

    def _parent_of(self, place: _Place, kind: type[nn.Module]) -> nn.Module:
        """The module holding ``place`` now, after checking that it still holds the original
        (or a ``kind`` swap of it made by another adapter).

        Raises:
            RuntimeError: the model changed since the adapter was built, or the module lies
                inside a module another adapter swapped.
        """
        state = swaps.state_of(self.model)
        replacements = {id(swap.replacement): name for name, swap in state.swaps.items()} if state else {}
        parent = self.model
        for depth, key in enumerate(place.parent_path):
            child = parent._modules.get(key)
            if child is None:
                raise RuntimeError(
                    f"{place.name!r}: the model has no module {'.'.join(place.parent_path[: depth + 1])!r} any more; "
                    "build the adapter again for the model as it is now"
                )
            if id(child) in replacements:
                raise RuntimeError(
                    f"{place.name!r} lies inside {replacements[id(child)]!r}, which another LoRA adapter replaced "
                    "(as a target or a module to save); the two adapters cannot be attached together"
                )
            parent = child
        current = parent._modules.get(place.child_name)
        swap = state.swaps.get(place.name) if state else None
        if current is place.original and swap is None:
            return parent
        if swap is not None and current is swap.replacement and swap.original is place.original:
            if not isinstance(current, kind):
                raise RuntimeError(
                    f"{place.name!r} is a {'module to save' if kind is LoraLayer else 'LoRA target'} of adapters "
                    f"{swap.users}; it cannot also be a {'LoRA target' if kind is LoraLayer else 'module to save'} here"
                )
            return parent
        raise RuntimeError(
            f"{place.name!r} is no longer the module this adapter was built for (found {type(current).__name__}); "
            "build the adapter again for the model as it is now"
        )

    def _install(self, undo: UndoStack) -> None:
        with swaps.lock:
            self._install_locked(undo)

    def _install_locked(self, undo: UndoStack) -> None:
        name = self.adapter_name
        state = swaps.acquire_model(self.model, name, self, undo)
        for target in self._targets:
            place = target.place
            layer = state.acquire_swap(
                place.name, self._parent_of(place, LoraLayer), place.child_name, place.original, wrap_module, name
            )
            undo.push(_bound(state.release_swap, place.name, name))
            assert isinstance(layer, LoraLayer)
            _lend(target.home, layer, name)
            undo.push(_bound(layer.delete_adapter, name))
            swaps.match_training(layer, place.original)
        for place, duplicate in self._saved:
            wrapper = state.acquire_swap(
                place.name, self._parent_of(place, ModulesToSaveWrapper), place.child_name, place.original,
                ModulesToSaveWrapper, name,
            )
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
                a target's weight holds a merged (IA)^3 vector.
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
            self._check_no_merged_ia3(layers)
            for layer in layers:
                layer.merge([self.adapter_name])
            self._merged = True

    @staticmethod
    def _check_no_merged_ia3(layers: Sequence[LoraLayer]) -> None:
        from prefix_hooks.ia3 import scaling  # late: IA3 imports LoRA

        for layer in layers:
            found = scaling.scaling_of(layer.base_layer)
            if found is not None and any(entry.merged for entry in found.entries):
                raise RuntimeError(
                    f"the weight of {type(layer.base_layer).__name__} {id(layer.base_layer):#x} holds a merged (IA)^3 "
                    "vector; unmerge the (IA)^3 adapter before merging LoRA into the same module (each restores the "
                    "weight it saw)"
                )

    def unmerge(self) -> None:
        """Take this adapter out of the base weights (no-op when it is not merged)."""
        with swaps.lock:
            if not self._merged:
                return
            for layer in self._layers():
                others = [name for name in layer.merged_adapters if name != self.adapter_name]
                layer.unmerge()  # copies the saved original back: bit-exact
                if others:
                    layer.merge(others)
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
            with swaps.lock, torch.no_grad():
                for layer in self._layers():
                    others = list(layer.merged_adapters)
                    layer.unmerge()
                    weight = layer.base_weight()
                    weight.add_(layer.delta_weight(self.adapter_name).to(weight.device))  # the new base weight
                    if others:
                        layer.merge(others)
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


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active LoRA adapters of ``model`` (in that order; ``[]`` = none).

    Raises:
        ValueError: a name is not a LoRA adapter attached to ``model``.
        RuntimeError: a merged adapter would become inactive (unmerge it first).
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of adapter names, got the string {names!r}")
    with swaps.lock:
        state = swaps.state_of(model)
        if state is None:
            raise ValueError(f"no LoRA adapter is attached to {type(model).__name__}; cannot activate {list(names)}")
        attached = dict(state.adapters)
        unknown = [name for name in names if name not in attached]
        if unknown:
            raise ValueError(
                f"{unknown} are not LoRA adapters attached to {type(model).__name__}; attached: {sorted(attached)}"
            )
        for name, attachment in attached.items():
            if attachment.is_merged and name not in names:
                raise RuntimeError(f"LoRA adapter {name!r} is merged; unmerge() it before deactivating it")
        state.active = list(dict.fromkeys(names))
        state.refresh()


def active_adapters(model: nn.Module) -> list[str]:
    """The active LoRA adapters of ``model`` that run in this thread / task (not inside their
    ``disabled()`` block here), in order."""
    with swaps.lock:
        state = swaps.state_of(model)
        return state.effective_active() if state is not None else []


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Give each batch row its own LoRA adapter for the forwards run inside the block.

    Row ``b`` gets the adapter named ``names[b]`` (``"__base__"``: no adapter), whatever the
    active set. The same works as a forward keyword, ``model(**batch, adapter_names=names)``;
    ``model.generate()`` rejects keywords its model does not declare, so for generation use
    ``with adapter_rows(model, names): model.generate(...)``.

    Raises:
        ValueError / TypeError: a name is not an adapter attached to ``model`` (checked here),
            or, at forward time, the number of names is not the batch size.
    """
    with swaps.lock:
        swaps.check_row_names(model, swaps.state_of(model), names)
    with adapter_rows_context(names):
        yield


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
        config: the LoRA config.
            Or the path (``str`` / ``os.PathLike``) of a saved adapter folder, ours or
            PEFT's, or a hub id: the adapter is loaded frozen (``load_adapter(...,
            trainable=True)`` resumes training).
        adapter_name: a Python identifier naming the adapter.

    Returns:
        The (not yet attached) :class:`LoraAttachment`.

    Raises:
        TypeError: ``config`` is not a :class:`LoraConfig`.
        ValueError: the targets or modules to save match nothing or an unsupported module.

    Example:
        >>> with attach_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])) as handle:
        ...     trainer.train()
        ...     handle.merge()            # fast inference inside the block
        >>> # here `model` is exactly the model it was before
    """
    return built_or_loaded(model, config, LoraAttachment, adapter_name)
