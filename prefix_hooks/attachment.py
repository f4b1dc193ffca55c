"""The attach/detach lifecycle shared by every adapter method.

An :class:`Attachment` is built (and validated) once, then attached and detached any
number of times: as a context manager, as a decorator, or by hand. Attaching records
an undo action for every mutation it makes; detaching runs them in reverse, always
to the end, so the model returns to exactly the state it had before (the *previous*
state in nested blocks, not a default).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import wrapt
from torch import nn

from prefix_hooks import compiled

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


# ids of the attachments disabled in the current thread / async task
_disabled: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("prefix_hooks_disabled", default=frozenset())

# model -> attachments currently attached to it, oldest first
_attached: weakref.WeakKeyDictionary[nn.Module, list[Attachment]] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()


def attachments_of(model: nn.Module) -> list[Attachment]:
    """The attachments currently attached to ``model``, oldest first."""
    with _attached_lock:
        return list(_attached.get(model, ()))


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

    def restore() -> None:
        for module, name, flag in flags:
            parameter = module._parameters.get(name)
            if parameter is not None:
                parameter.requires_grad_(flag)

    undo.push(restore)
    for module, name, _ in flags:
        module._parameters[name].requires_grad_(False)  # type: ignore[union-attr]


def register_child(model: nn.Module, name: str, child: nn.Module, undo: UndoStack) -> None:
    """Register ``child`` under ``model`` so ``model.parameters()`` yields its parameters.

    Raises:
        ValueError: ``name`` is already an attribute of ``model``.
    """
    if hasattr(model, name):
        raise ValueError(f"cannot register the adapter as {name!r}: {type(model).__name__} already has that attribute")
    model._modules[name] = child  # appended last, so parameter order before it is unchanged

    def unregister() -> None:
        del model._modules[name]

    undo.push(unregister)


def _shadow_save_pretrained(model: nn.Module, undo: UndoStack) -> None:
    """While attached, ``model.save_pretrained`` also writes the adapters (Trainer checkpoints load);
    see :mod:`prefix_hooks.checkpoint.model_saves`."""
    from prefix_hooks.checkpoint import model_saves  # late: the checkpoint package imports this module

    model_saves.acquire(model, undo)


logger = logging.getLogger(__name__)
"""Attach/detach events at INFO, failed attaches at DEBUG (silent unless the application configures logging)."""


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

        def untrack() -> None:
            with _attached_lock:
                stack = _attached.get(self.model, [])
                stack.remove(self)
                if not stack:
                    _attached.pop(self.model, None)

        undo.push(untrack)

    def _attached_after(self) -> list[Attachment]:
        stack = attachments_of(self.model)
        return stack[stack.index(self) + 1 :] if self in stack else []

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
        from prefix_hooks.checkpoint.api import save_adapter

        save_adapter(self, save_directory)

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
