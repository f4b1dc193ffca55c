"""The module swaps LoRA attachments share on one model, counted per user.

Several LoRA adapters (different names) may be attached to one model at once and
detached in any order. They share:

- the *swaps*: a target module ``parent.child`` replaced by one :class:`AdapterHolder` (a LoRA
  layer, or a modules-to-save wrapper) holding every adapter that targets it. The first adapter
  that needs the swap makes it; the original module object goes back, at the same
  place in ``parent._modules``, when the last adapter using it is removed;
- the *freeze*: base parameters are frozen by the first LoRA adapter attached and
  their flags restored when the last one is detached (a per-adapter freeze would
  restore the wrong flags when adapters are detached out of order);
- parameters made trainable on top of the freeze (``bias="all"`` / ``"lora_only"``),
  counted per parameter;
- one root forward pre-hook that turns the ``adapter_names=[...]`` forward keyword into
  a per-row selection (see :mod:`prefix_hooks.core.rows`).

Everything model-level is undone through an :class:`~prefix_hooks.core.attachment.UndoStack`
when the last user leaves, so detaching every adapter leaves no trace.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

from prefix_hooks.core.attachment import UndoStack, attachments_of, freeze_parameters
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.places import Place, parent_now
from prefix_hooks.core.rows import _ADAPTER_ROWS, BASE_ROW, validate_adapter_rows

ADAPTER_NAMES_KWARG = "adapter_names"
"""Forward keyword (PEFT's) selecting an adapter per batch row: ``model(**batch, adapter_names=[...])``."""


@runtime_checkable
class AdapterHolder(Protocol):
    """What stands in for a swapped module: a module holding several named adapters, some active.

    A LoRA layer and a :class:`~prefix_hooks.core.modules_to_save.ModulesToSaveWrapper` are both.
    """

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters it holds, in the order they were added."""
        ...

    @property
    def active_adapters(self) -> list[str]:
        """The adapters it runs; :meth:`ModelSwaps.refresh` changes this list in place."""
        ...


@dataclass
class Swap:
    """One module of the model replaced while some adapters use it.

    Attributes:
        parent: the module holding it; ``child_name`` its key in ``parent._modules``.
        original: the module that was there (put back when ``users`` empties).
        replacement: the :class:`AdapterHolder` standing in for it (a LoRA layer or a wrapper).
        users: names of the adapters using the swap.
    """

    parent: nn.Module
    child_name: str
    original: nn.Module
    replacement: nn.Module
    users: list[str] = field(default_factory=list)


@dataclass
class ModelSwaps:
    """What the LoRA adapters attached to one model share (see the module docstring).

    Attributes:
        swaps: qualified module name -> its swap.
        adapters: the attached LoRA adapters by name (attachment objects).
        active: the adapters the user wants active, in order (default: every attached one);
            model-wide. A handle's ``disabled()`` switches its adapter off on top of this, in
            one thread / async task only (the layers read the switch at each forward).
        trainable: ``id(parameter)`` -> (parameter, number of adapters that made it trainable).
        undo: the model-level mutations of the first user (freeze, root hooks).
    """

    swaps: dict[str, Swap] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: dict[int, tuple[nn.Parameter, int]] = field(default_factory=dict)
    undo: UndoStack = field(default_factory=UndoStack)

    # --- swaps ------------------------------------------------------------------------
    def acquire_swap(
        self, place: Place, parent: nn.Module, make: Callable[[nn.Module], nn.Module], user: str
    ) -> nn.Module:
        """The replacement standing in for ``place.original`` (made and swapped in on first use), with ``user`` counted.

        ``parent`` holds the place now (:func:`parent_for`); ``make(original)`` must return an
        :class:`AdapterHolder`.
        """
        swap = self.swaps.get(place.name)
        if swap is None:
            replacement = make(place.original)
            parent._modules[place.child_name] = replacement  # same key, same position in the dict
            swap = self.swaps[place.name] = Swap(parent, place.child_name, place.original, replacement)
        swap.users.append(user)
        return swap.replacement

    def release_swap(self, name: str, user: str) -> None:
        """Uncount ``user``; the last user puts the original module object back."""
        swap = self.swaps[name]
        swap.users.remove(user)
        if not swap.users:
            swap.parent._modules[swap.child_name] = swap.original
            del self.swaps[name]

    def effective_active(self) -> list[str]:
        """The active adapters not switched off by their handle's ``disabled()`` in this thread / task."""
        return [name for name in self.active if self.adapters[name].is_enabled]

    def refresh(self) -> None:
        """Give every swapped layer and wrapper the active adapters it holds."""
        for swap in self.swaps.values():
            holder = swap.replacement
            assert isinstance(holder, AdapterHolder)  # as acquire_swap's `make` promised
            held = holder.adapter_names
            wanted = [name for name in self.active if name in held]
            if holder.active_adapters != wanted:
                # in place: the list object of a layer other adapters keep using stays the same
                holder.active_adapters[:] = wanted

    # --- trainable parameters on top of the freeze ------------------------------------
    def make_trainable(self, parameters: Iterable[nn.Parameter], undo: UndoStack) -> None:
        """Set ``requires_grad=True`` on ``parameters`` until the undo runs (counted per parameter)."""
        unique = list({id(p): p for p in parameters}.values())
        for parameter in unique:
            _, count = self.trainable.get(id(parameter), (parameter, 0))
            self.trainable[id(parameter)] = (parameter, count + 1)
            parameter.requires_grad_(True)

        def restore() -> None:
            for parameter in unique:
                _, count = self.trainable[id(parameter)]
                if count == 1:
                    del self.trainable[id(parameter)]
                    parameter.requires_grad_(False)  # the shared freeze's value; its undo restores the original
                else:
                    self.trainable[id(parameter)] = (parameter, count - 1)

        undo.push(restore)


def match_training(replacement: nn.Module, original: nn.Module) -> None:
    """Put ``replacement`` and its adapter modules in ``original``'s train/eval mode.

    ``original`` (a child of ``replacement``) and its submodules are not touched: their flags
    are part of the model that detach restores.
    """

    def visit(module: nn.Module) -> None:
        if module is original:
            return
        module.training = original.training
        for child in module._modules.values():
            if child is not None:
                visit(child)

    visit(replacement)


_states: weakref.WeakKeyDictionary[nn.Module, ModelSwaps] = weakref.WeakKeyDictionary()
lock = threading.RLock()
"""Held while LoRA adapters of any model are attached or detached."""


def state_of(model: nn.Module) -> ModelSwaps | None:
    """The shared state of the LoRA adapters attached to ``model`` (None when there are none)."""
    return _states.get(model)


def parent_for(model: nn.Module, place: Place, kind: type[nn.Module]) -> nn.Module:
    """The module holding ``place`` now, after checking that it still holds the original
    (or a ``kind`` swap of it made by another adapter).

    Args:
        kind: the replacement the caller swaps in: :class:`ModulesToSaveWrapper` for a module
            to save, a LoRA layer class for a target.

    Raises:
        RuntimeError: the model changed since the adapter was built, the module lies inside
            a module another adapter swapped, or another adapter swapped it in another role.
    """
    state = _states.get(model)
    replacements = {id(swap.replacement): name for name, swap in state.swaps.items()} if state else {}
    parent = parent_now(model, place, replacements)
    current = parent._modules.get(place.child_name)
    swap = state.swaps.get(place.name) if state else None
    if current is place.original and swap is None:
        return parent
    if swap is not None and current is swap.replacement and swap.original is place.original:
        if not isinstance(current, kind):
            roles = ("LoRA target", "module to save")
            wanted, found = roles[::-1] if kind is ModulesToSaveWrapper else roles
            raise RuntimeError(
                f"{place.name!r} is a {found} of adapters {swap.users}; it cannot also be a {wanted} here"
            )
        return parent
    raise RuntimeError(
        f"{place.name!r} is no longer the module this adapter was built for (found {type(current).__name__}); "
        "build the adapter again for the model as it is now"
    )


def acquire_model(model: nn.Module, adapter_name: str, attachment: Any, undo: UndoStack) -> ModelSwaps:
    """Count ``attachment`` as a LoRA user of ``model``; the first user freezes the base and hooks the root.

    The undo pushed here uncounts it; the last user's undo restores the model-level state.
    """
    state = _states.get(model)
    if state is not None and adapter_name in state.adapters:
        raise RuntimeError(f"a LoRA adapter named {adapter_name!r} is already attached to {type(model).__name__}")
    if state is None:
        state = ModelSwaps()
        try:
            freeze_parameters(model, state.undo)
            # first, so no other pre-hook can fail between it and the always-called post-hook
            hook = model.register_forward_pre_hook(_pop_adapter_names, with_kwargs=True, prepend=True)
            state.undo.push(hook.remove)
            post = model.register_forward_hook(_reset_adapter_names, with_kwargs=True, always_call=True)
            state.undo.push(post.remove)
        except BaseException:
            state.undo.unwind()
            raise
        _states[model] = state
    state.adapters[adapter_name] = attachment

    def release() -> None:
        del state.adapters[adapter_name]
        if not state.adapters:
            del _states[model]
            state.undo.unwind()

    undo.push(release)
    return state


# --- adapter_names=[...] as a forward keyword ------------------------------------------
# Per thread: one entry per root forward running (nested calls stack), the token of the
# per-row selection its pre-hook set, or None. The post-hook (always called, also after an
# exception) pops it. A KeyboardInterrupt skips always-called hooks: that thread's next
# forwards may then see a stale selection.
_row_tokens = threading.local()


def _tokens() -> list[Token[tuple[str, ...] | None] | None]:
    stack: list[Token[tuple[str, ...] | None] | None] | None = getattr(_row_tokens, "stack", None)
    if stack is None:
        stack = _row_tokens.stack = []
    return stack


def _pop_adapter_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    stack = _tokens()
    stack.append(None)  # before anything can raise: the post-hook pops one entry per call
    if ADAPTER_NAMES_KWARG not in kwargs:
        return None
    kwargs = dict(kwargs)
    names = kwargs.pop(ADAPTER_NAMES_KWARG)
    if names is not None:
        check_row_names(module, _states.get(module), names)
        stack[-1] = _ADAPTER_ROWS.set(validate_adapter_rows(names))
    return args, kwargs


def _reset_adapter_names(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
    stack = _tokens()
    if stack:
        token = stack.pop()
        if token is not None:
            _ADAPTER_ROWS.reset(token)


def check_row_names(model: nn.Module, state: ModelSwaps | None, names: object) -> None:
    """Raise unless every entry of ``names`` is an adapter attached to ``model`` or ``"__base__"``."""
    rows = validate_adapter_rows(names)  # type: ignore[arg-type]
    known = set(state.adapters) if state is not None else set()
    unknown = sorted({name for name in rows if name != BASE_ROW and name not in known})
    if unknown:
        raise ValueError(
            f"adapter names {unknown} are not LoRA adapters attached to {type(model).__name__}; "
            f"attached: {sorted(known)} (or {BASE_ROW!r} for the base model)"
        )


# --- a view of the model as it is without any adapter -------------------------------------
def clean_view(model: nn.Module) -> nn.Module:
    """``model`` as it would be with no adapter attached, for selecting modules by name.

    Swapped modules show their originals and modules registered by attachments
    (prefix encoders) are hidden. Modules on the path to a swap are shallow stand-ins
    (same class, same attributes, other ``_modules``); everything else is the model's own
    object, so the originals found in the view are the model's modules. Nothing is mutated.
    """
    state = _states.get(model)
    swapped = {id(swap.replacement): swap.original for swap in state.swaps.values()} if state else {}
    # modules-to-save wrappers of other methods (IA3, prefix, prompt) are swaps too
    swapped.update(
        {id(module): module.original_module for module in model.modules() if isinstance(module, ModulesToSaveWrapper)}
    )
    hidden = {id(m) for attachment in attachments_of(model) for m in attachment.adapter_modules()}
    if not swapped and not hidden:
        return model
    memo: dict[int, bool] = {}

    def touched(module: nn.Module) -> bool:
        if id(module) not in memo:
            memo[id(module)] = any(
                id(child) in swapped or id(child) in hidden or touched(child)
                for child in module._modules.values()
                if child is not None
            )
        return memo[id(module)]

    def view(module: nn.Module) -> nn.Module:
        if not touched(module):
            return module
        stand_in = object.__new__(type(module))
        stand_in.__dict__.update(module.__dict__)
        children: dict[str, nn.Module | None] = {}
        for key, child in module._modules.items():
            if child is not None and id(child) in hidden:
                continue
            if child is not None and id(child) in swapped:
                child = swapped[id(child)]
            children[key] = view(child) if child is not None else None
        stand_in.__dict__["_modules"] = children
        return stand_in

    return view(model)


def originals(model: nn.Module, view: nn.Module, names: Sequence[str], role: str) -> dict[str, nn.Module]:
    """The modules named ``names`` in ``view`` (the :func:`clean_view` of ``model``), by name.

    They are the model's own objects (or originals a swap keeps); call with :data:`lock` held
    since the view was taken.

    Raises:
        ValueError: a named module is a stand-in of the view: modules that attached LoRA
            adapters swapped lie inside it, so it cannot be ``role`` (e.g. ``"a target"``) now.
    """
    modules = dict(view.named_modules())
    real = {id(module) for module in model.modules()}
    state = _states.get(model)
    real.update(id(swap.original) for swap in (state.swaps.values() if state else ()))
    for name in names:
        if id(modules[name]) not in real:
            raise ValueError(
                f"{name!r} contains modules that attached LoRA adapters replaced; it cannot be {role} while they "
                "are attached"
            )
    return {name: modules[name] for name in names}
