"""The attach/detach lifecycle shared by every adapter method: :class:`Attachment`.

An :class:`Attachment` is built (and validated) once, then attached and detached any
number of times: as a context manager, as a decorator, or by hand. Attaching records
an undo action for every mutation it makes (:mod:`prefix_hooks.core.undo`); detaching runs
them in reverse, always to the end, so the model returns to exactly the state it had before
(the *previous* state in nested blocks, not a default).

A copy of an attached model (``copy.deepcopy``, ``pickle``) carries its own attached adapter;
see :mod:`prefix_hooks.core.copies`.

The pieces every method uses while attaching are importable from here too: :class:`UndoStack`,
:class:`Hold`, :func:`attachments_of`, :func:`freeze_parameters`, :func:`register_child`.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from torch import nn

from prefix_hooks.core import compiled
from prefix_hooks.core.attached import attachments_of, track, track_copy
from prefix_hooks.core.checkpoints import checkpoint_format
from prefix_hooks.core.context_decorator import entered_while_running
from prefix_hooks.core.copies import copy_blockers, copyable_state, release_holds_when_dropped, restored_state
from prefix_hooks.core.mutations import freeze_parameters, register_child
from prefix_hooks.core.undo import Hold, UndoStack

__all__ = ["Attachment", "Hold", "UndoStack", "attachments_of", "freeze_parameters", "register_child"]

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound="Attachment")

# ids of the attachments disabled in the current thread / async task
_disabled: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("prefix_hooks_disabled", default=frozenset())


def _shadow_save_pretrained(model: nn.Module, undo: UndoStack) -> None:
    """While attached, ``model.save_pretrained`` also writes the adapters (Trainer checkpoints load);
    see :mod:`prefix_hooks.checkpoint.model_saves` (registered
    through :mod:`prefix_hooks.core.checkpoints`)."""
    checkpoint_format().shadow_save_pretrained(model, undo)


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
                    track(self, undo)
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
        carries its own attached adapter (see :mod:`prefix_hooks.core.copies`).

        Raises:
            TypeError: an undo action or hook of this attachment would still act on the original
                model from the copy (a closure); the message names it.
        """
        blockers = copy_blockers(self._undo)
        if blockers:
            raise TypeError(
                f"cannot copy {self._describe()} while it is attached: {'; '.join(blockers)} would act on the "
                "original model from the copy. Detach it before copying, or copy the adapter's weights "
                "(handle.save / state_dict) instead"
            )
        return copyable_state(self.__dict__, ("_lock", *self._transient_attributes))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Finish a copy: new lock, empty per-thread state; an attached copy registers as attached to its
        model (``attachments_of(copy)``) with one level of attachment, so one ``detach()`` restores it."""
        self.__dict__.update(restored_state(state))
        self._lock = threading.RLock()
        self._reset_transient()
        if self._depth and any(other._undo is self._undo for other in attachments_of(self.model)):
            raise TypeError(
                f"a shallow copy of the attached {self._describe()} would share its model and undo steps; "
                "copy.deepcopy the model instead (the copy carries its own adapter)"
            )
        if self._depth:
            self._depth = 1
            track_copy(self)
            assert self._undo is not None
            release_holds_when_dropped(self, self._undo)  # a copy dropped without detach frees its counts

    def __enter__(self: A) -> A:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __call__(self, wrapped: F) -> F:
        """Decorate a function or method so the adapter is attached while it runs.

        Generators and coroutines keep the adapter attached until they finish.
        """
        return entered_while_running(self, wrapped)

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
