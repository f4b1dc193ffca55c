"""The attach/detach lifecycle shared by every adapter method.

An :class:`Attachment` is built (and validated) once, then attached and detached any
number of times: as a context manager, as a decorator, or by hand. Attaching records
an undo action for every mutation it makes; detaching runs them in reverse, always
to the end, so the model returns to exactly the state it had before (the *previous*
state in nested blocks, not a default).

Copies. ``copy.deepcopy`` (an EMA copy, ``torch.optim.swa_utils.AveragedModel``) and ``pickle``
/ ``torch.save`` of an attached model give a model that carries its own attached adapter: the
adapter's modules are copied with the model, the copy's hooks and shadows run the copy's
attachment, and ``attachments_of(copy)`` holds it, so it detaches on its own and leaves the
original alone. This works because everything an attachment leaves in the model and every undo
action is rebuilt by the copy with references to the copy (bound methods, ``functools.partial``
of module-level functions, :class:`Hold`; never closures): :meth:`Attachment.__getstate__`
refuses, with an error naming the step, to copy an attachment whose undo actions or hooks are
not.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar, cast

import wrapt
from torch import nn
from torch.utils.hooks import RemovableHandle

from prefix_hooks.core import compiled
from prefix_hooks.core.checkpoints import checkpoint_format

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound="Attachment")


class UndoStack:
    """Undo actions run last-in first-out; every action runs even if one fails."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def unwind(self) -> None:
        """Run every action in reverse; re-raise the first failure after all have run."""
        first_error: BaseException | None = None
        while self._actions:
            action = self._actions.pop()
            try:
                action()
            except BaseException as error:  # noqa: BLE001 - restoration must finish first
                first_error = first_error or error
        if first_error is not None:
            raise first_error

    def actions(self) -> list[Callable[[], None]]:
        """The pending actions, in the order they were pushed."""
        return list(self._actions)


_hold_lock = threading.Lock()


class Hold:
    """One count of a process-wide, refcounted resource (acquired now); calling it releases the count.

    Used as the undo action of ``acquire()`` / ``release()`` pairs (the attention interposer, the
    optimizer-step counter). A copy of an attached model (``copy.deepcopy``, unpickling) rebuilds
    its Holds, which acquires again: the copy's detach releases the copy's counts, never the
    original's. Releasing twice is a no-op (a copy dropped without detach releases from a finalizer).
    """

    __slots__ = ("_acquire", "_held", "_release")

    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
        acquire()
        self._acquire, self._release, self._held = acquire, release, True

    def __call__(self) -> None:
        with _hold_lock:
            held, self._held = self._held, False
        if held:
            self._release()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Hold, (self._acquire, self._release))


def _release_holds(holds: list[Hold]) -> None:
    for hold in holds:
        hold()


# ids of the attachments disabled in the current thread / async task
_disabled: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("prefix_hooks_disabled", default=frozenset())

# model -> attachments currently attached to it, oldest first. Attachments made by copying a model
# are held weakly: the copy's own shadows keep them alive, and a strong entry would keep the copy
# (its weak key) alive forever through the attachment's reference to it.
_attached: weakref.WeakKeyDictionary[nn.Module, list[Attachment | weakref.ref[Attachment]]] = (
    weakref.WeakKeyDictionary()
)
_attached_lock = threading.Lock()


def _resolve(entry: Attachment | weakref.ref[Attachment]) -> Attachment | None:
    return entry() if isinstance(entry, weakref.ref) else entry


def attachments_of(model: nn.Module) -> list[Attachment]:
    """The attachments currently attached to ``model``, oldest first (on a copy of an attached model:
    the copy's own attachments, which detach without touching the original)."""
    with _attached_lock:
        found = (_resolve(entry) for entry in _attached.get(model, ()))
        return [attachment for attachment in found if attachment is not None]


def _untrack(attachment: Attachment) -> None:
    with _attached_lock:
        stack = _attached.get(attachment.model, [])
        stack[:] = [entry for entry in stack if _resolve(entry) not in (attachment, None)]
        if not stack:
            _attached.pop(attachment.model, None)


def freeze_parameters(model: nn.Module, undo: UndoStack) -> None:
    """Set ``requires_grad=False`` on every base parameter of ``model``; undo restores each flag.

    Parameters of the adapters already attached to ``model`` (their ``adapter_modules()``
    and ``trained_base_parameters()``) are left as they are, so methods attached together
    (prefix + LoRA) all stay trainable.
    """
    attached = attachments_of(model)
    adapter_ids = {id(parameter) for attachment in attached for parameter in attachment.parameters()}
    adapter_ids |= {id(parameter) for attachment in attached for parameter in attachment.trained_base_parameters()}
    # recorded by (module, name): a wrapper may replace the parameter objects while attached
    # (FSDP2's fully_shard swaps in DTensor parameters), and the flags belong to whatever is there
    flags = [
        (module, name, parameter.requires_grad)
        for module in model.modules()
        for name, parameter in module._parameters.items()
        if parameter is not None and id(parameter) not in adapter_ids
    ]

    undo.push(functools.partial(_restore_flags, flags))
    for module, name, _ in flags:
        module._parameters[name].requires_grad_(False)  # type: ignore[union-attr]


def _restore_flags(flags: list[tuple[nn.Module, str, bool]]) -> None:
    for module, name, flag in flags:
        parameter = module._parameters.get(name)
        if parameter is not None:
            parameter.requires_grad_(flag)


def register_child(model: nn.Module, name: str, child: nn.Module, undo: UndoStack) -> None:
    """Register ``child`` under ``model`` so ``model.parameters()`` yields its parameters.

    Raises:
        ValueError: ``name`` is already an attribute of ``model``.
    """
    if hasattr(model, name):
        raise ValueError(f"cannot register the adapter as {name!r}: {type(model).__name__} already has that attribute")
    model._modules[name] = child  # appended last, so parameter order before it is unchanged
    undo.push(functools.partial(_unregister_child, model, name))


def _unregister_child(model: nn.Module, name: str) -> None:
    del model._modules[name]


def _shadow_save_pretrained(model: nn.Module, undo: UndoStack) -> None:
    """While attached, ``model.save_pretrained`` also writes the adapters (Trainer checkpoints load);
    see :mod:`prefix_hooks.checkpoint.model_saves` (registered
    through :mod:`prefix_hooks.core.checkpoints`)."""
    checkpoint_format().shadow_save_pretrained(model, undo)


logger = logging.getLogger(__name__)
"""Attach/detach events at INFO, failed attaches at DEBUG (silent unless the application configures logging)."""


class _FreshContextVar:
    """In a copied attachment's state: a per-thread variable to create anew (``default=None``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FreshContextVar, (self.name,))


def _closure_free(function: object) -> bool:
    return isinstance(function, types.FunctionType) and function.__closure__ is None


def _not_rebound(action: Callable[[], None]) -> str | None:
    """Why the undo ``action`` of an attached model would still act on the original in a copy, else ``None``.

    Rebound: a :class:`Hold`; a bound method (its object is copied with the model), unless it removes
    a hook that is a closure; a ``functools.partial`` of a module-level function or bound method (its
    arguments are copied). Not rebound: closures and lambdas (copied as the same function object, with
    the original's cells), bare functions (they act on process state a copy does not hold).
    """
    if isinstance(action, Hold):
        return None
    if isinstance(action, functools.partial) and (
        _closure_free(action.func) or isinstance(action.func, types.MethodType)
    ):
        return None
    if isinstance(action, types.MethodType) and _closure_free(action.__func__):
        handle = action.__self__
        if isinstance(handle, RemovableHandle):
            hooks = handle.hooks_dict_ref()
            hook = None if hooks is None else hooks.get(handle.id)
            if isinstance(hook, types.FunctionType) and hook.__closure__ is not None:
                return f"the hook {hook.__qualname__} (a closure)"
        return None
    return f"the detach step {getattr(action, '__qualname__', repr(action))}"


def _counted_numel(parameter: nn.Parameter) -> int:
    """Elements of ``parameter`` as PEFT counts them: bitsandbytes' 4-bit weights pack two values
    per byte of their storage, so each stored element counts ``2 * element_size()``."""
    count = parameter.numel()
    if type(parameter).__name__ == "Params4bit":
        count *= 2 * parameter.element_size()
    return count


class Attachment(abc.ABC):
    """An adapter bound to one model, attachable as a context, a decorator or by hand.

    Example:
        >>> handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=8))
        >>> with handle:                      # attached inside, restored after
        ...     loss = model(**batch).loss
        >>> @handle                           # attached for each call
        ... def evaluate(batch): ...
        >>> handle.attach(); ...; handle.detach()

    Attaching the same handle again while attached only counts; the last matching
    ``detach`` restores the model.
    """

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
            raise ValueError(f"adapter_name={adapter_name!r} is not accepted; expected a Python identifier")
        self.model = model
        self.adapter_name = adapter_name
        self._lock = threading.RLock()
        self._depth = 0
        self._undo: UndoStack | None = None

    # --- what a method provides -------------------------------------------------
    virtual_tokens: ClassVar[str | None] = None
    """What the method puts in front of the sequence (``"prefix"``, ``"prompt"``), ``None`` for
    nothing. Two methods that both add virtual tokens do not combine on one model."""

    @abc.abstractmethod
    def _check_can_attach(self) -> None:
        """Raise if this adapter cannot be attached to the model as it is now."""

    @abc.abstractmethod
    def _install(self, undo: UndoStack) -> None:
        """Mutate the model, pushing an undo action for every mutation."""

    @abc.abstractmethod
    def adapter_modules(self) -> list[nn.Module]:
        """The modules holding this adapter's parameters."""

    def trained_base_parameters(self) -> list[nn.Parameter]:
        """Base parameters this adapter makes trainable while attached (e.g. LoRA's biases);
        other methods attached later leave them trainable."""
        return []

    # --- lifecycle ----------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return self._depth > 0

    def attach(self: A) -> A:
        """Attach to the model (or count one more use if already attached) and return self.

        Raises:
            ValueError / RuntimeError: the adapter cannot be attached; the model is untouched.
        """
        with self._lock:
            if self._depth == 0:
                try:
                    compiled.prepare_for_attach(self.model)  # compiled graphs would ignore new hooks
                    self._check_can_attach()
                except BaseException:
                    logger.debug("attaching %s was refused; the model is untouched", self._describe())
                    raise
                undo = UndoStack()
                try:
                    self._install(undo)
                    self._track(undo)
                    _shadow_save_pretrained(self.model, undo)
                except BaseException:
                    undo.unwind()
                    logger.debug("attaching %s failed; the model was restored", self._describe())
                    raise
                self._undo = undo
                logger.info("attached %s", self._describe())
            self._depth += 1
        return self

    def _describe(self) -> str:
        return f"{type(self).__name__} {self.adapter_name!r} to {type(self.model).__name__}"

    def detach(self) -> None:
        """Undo one ``attach``; the last one restores the model exactly.

        Raises:
            RuntimeError: not attached, or another adapter attached later is still attached.
        """
        with self._lock:
            if self._depth == 0:
                raise RuntimeError(f"adapter {self.adapter_name!r} is not attached")
            if self._depth == 1:
                later = self._attached_after()
                if later:
                    names = ", ".join(repr(a.adapter_name) for a in later)
                    raise RuntimeError(
                        f"detach {names} first: attachments are restored in reverse order of attaching"
                    )
            self._depth -= 1
            if self._depth == 0:
                undo, self._undo = self._undo, None
                assert undo is not None
                undo.unwind()
                logger.info("detached %s; the model is restored", self._describe().replace(" to ", " from ", 1))

    def _track(self, undo: UndoStack) -> None:
        with _attached_lock:
            _attached.setdefault(self.model, []).append(self)
        undo.push(functools.partial(_untrack, self))

    def _attached_after(self) -> list[Attachment]:
        stack = attachments_of(self.model)
        return stack[stack.index(self) + 1 :] if self in stack else []

    # --- copies (copy.deepcopy, pickle) -------------------------------------------------
    _transient_attributes: ClassVar[tuple[str, ...]] = ()
    """Attributes a copy does not take (memos, caches of the original's forwards); a subclass
    rebuilds them in :meth:`_reset_transient`."""

    def _reset_transient(self) -> None:
        """Give a copy fresh values of :attr:`_transient_attributes`."""

    def __getstate__(self) -> dict[str, Any]:
        """What a copy of this attachment is made of (``copy.deepcopy``, ``pickle``): everything but the
        lock, the per-thread state (``ContextVar``s, recreated empty with ``default=None``) and
        :attr:`_transient_attributes`.

        Copied together with its model (``copy.deepcopy(model)``), the attachment's references to the
        model and its modules become references to the copy's, and so do its undo actions: the copy
        carries its own attached adapter (see the module docstring).

        Raises:
            TypeError: an undo action or hook of this attachment would still act on the original
                model from the copy (a closure); the message names it.
        """
        blockers = self._copy_blockers()
        if blockers:
            raise TypeError(
                f"cannot copy {self._describe()} while it is attached: {'; '.join(blockers)} would act on the "
                "original model from the copy. Detach it before copying, or copy the adapter's weights "
                "(handle.save / state_dict) instead"
            )
        state = dict(self.__dict__)
        for name in ("_lock", *self._transient_attributes):
            state.pop(name, None)
        for name, value in state.items():
            if isinstance(value, contextvars.ContextVar):
                state[name] = _FreshContextVar(value.name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Finish a copy: new lock, empty per-thread state; an attached copy registers as attached to its
        model (``attachments_of(copy)``) with one level of attachment, so one ``detach()`` restores it."""
        for name, value in state.items():
            if isinstance(value, _FreshContextVar):
                state[name] = contextvars.ContextVar(value.name, default=None)
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._reset_transient()
        if self._depth and any(other._undo is self._undo for other in attachments_of(self.model)):
            raise TypeError(
                f"a shallow copy of the attached {self._describe()} would share its model and undo steps; "
                "copy.deepcopy the model instead (the copy carries its own adapter)"
            )
        if self._depth:
            self._depth = 1
            with _attached_lock:
                _attached.setdefault(self.model, []).append(weakref.ref(self))
            assert self._undo is not None
            holds = [action for action in self._undo.actions() if isinstance(action, Hold)]
            weakref.finalize(self, _release_holds, holds)  # a copy dropped without detach frees its counts

    def _copy_blockers(self) -> list[str]:
        """The undo actions (and the hooks they remove) that a copy could not rebind to itself."""
        if self._undo is None:
            return []
        return [reason for action in self._undo.actions() if (reason := _not_rebound(action)) is not None]

    def __enter__(self: A) -> A:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __call__(self, wrapped: F) -> F:
        """Decorate a function or method so the adapter is attached while it runs.

        Generators and coroutines keep the adapter attached until they finish.
        """
        attachment = self
        if inspect.isasyncgenfunction(wrapped):

            @wrapt.decorator
            async def async_gen_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                with attachment:
                    async for item in wrapped(*args, **kwargs):
                        yield item

            return cast(F, async_gen_wrapper(wrapped))
        if inspect.iscoroutinefunction(wrapped):

            @wrapt.decorator
            async def coroutine_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                with attachment:
                    return await wrapped(*args, **kwargs)

            return cast(F, coroutine_wrapper(wrapped))
        if inspect.isgeneratorfunction(wrapped):

            @wrapt.decorator
            def generator_wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                with attachment:
                    return (yield from wrapped(*args, **kwargs))

            return cast(F, generator_wrapper(wrapped))

        @wrapt.decorator
        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with attachment:
                return wrapped(*args, **kwargs)

        return cast(F, wrapper(wrapped))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """A context in which the attached model computes its base outputs.

        The switch is local to the current thread (and async task): forwards running
        elsewhere on the same model keep the adapter.
        """
        token = _disabled.set(_disabled.get() | {id(self)})
        try:
            yield
        finally:
            _disabled.reset(token)

    @property
    def is_enabled(self) -> bool:
        """False inside :meth:`disabled` in the current thread."""
        return id(self) not in _disabled.get()

    # --- checkpoints -------------------------------------------------------------
    def save(self, save_directory: str | os.PathLike[str]) -> None:
        """Save this adapter into ``save_directory`` in PEFT's folder layout (atomically); see
        :func:`prefix_hooks.checkpoint.save_adapter`. Load it back with ``load_adapter`` or ``attach``."""
        checkpoint_format().save_adapter(self, save_directory)

    # --- parameters -------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapter's parameters (available before the first attach)."""
        for module in self.adapter_modules():
            yield from module.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for module in self.adapter_modules():
            yield from module.named_parameters()

    def num_trainable_parameters(self) -> int:
        """Number of adapter parameter elements that require grad."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` as PEFT counts them: adapter plus base parameters."""
        adapter = {id(p): p for p in self.parameters()}
        base = [p for p in self.model.parameters() if id(p) not in adapter]
        total = sum(map(_counted_numel, base)) + sum(map(_counted_numel, adapter.values()))
        trainable = sum(_counted_numel(p) for p in adapter.values() if p.requires_grad)
        if not self.is_attached:
            return trainable, total
        trainable += sum(_counted_numel(p) for p in base if p.requires_grad)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's wording."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
