"""Instance attributes that shadow a module's class attributes while an adapter is attached.

torch runs forward hooks only inside ``Module.__call__``: a caller of ``module.forward(...)``
(sentence-transformers, a user, a task head calling its base model's ``forward``) bypasses
them. An instance attribute ``forward`` is found by every caller, ``__call__`` included (it
looks ``self.forward`` up), so an adapter that shadows ``forward`` acts however the module is
invoked. accelerate's hooks use the same mechanism; unlike them, removing a shadow puts back
exactly what was there: the previous instance attribute (accelerate's, say), or nothing, so
``module.__dict__`` is left as it was, key order included. A library that wrapped the shadow
meanwhile keeps its wrapper, and the shadow inside it turns into a pass-through; one that replaced
it by a forward that does not call it makes detach raise (see :func:`_restore_forward`).

Every object placed here is rebuilt by ``copy.deepcopy`` and ``pickle`` with the module it
belongs to (plain attributes, no closures), so a copy of an attached model carries working
shadows of its own (see :meth:`prefix_hooks.Attachment.__getstate__`).
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from prefix_hooks.core.attachment import UndoStack


class Missing(enum.Enum):
    """The marker of an absent instance attribute (an enum member: copies and pickles stay ``MISSING``)."""

    MISSING = "missing"


MISSING = Missing.MISSING

Run = Callable[..., Any]
"""``run(forward, *args, **kwargs)``: one call of the shadowed ``forward``; ``forward(*args, **kwargs)``
runs what ``module.forward`` was before the shadow."""


class ShadowedForward:
    """What ``module.forward`` is while an adapter is attached: ``run(previous_forward, *args, **kwargs)``.

    ``inspect.signature`` sees the previous forward's signature (``__wrapped__`` / ``__signature__``),
    so ``generate()``'s keyword validation and Trainer's column selection are unchanged.

    Args:
        module: the module whose ``forward`` is shadowed.
        run: the adapter's code around the call.
        previous: the instance attribute ``forward`` the module had (another library's), or
            :data:`MISSING` when ``forward`` came from the class (looked up at each call).
        owner: who installed the shadow, for messages (e.g. ``"prefix 'default'"``).
    """

    def __init__(self, module: nn.Module, run: Run, previous: Any, owner: str) -> None:
        self._shadowed_module = module
        self._run = run
        self._previous = previous
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._call_previous, *args, **kwargs)

    def _call_previous(self, *args: Any, **kwargs: Any) -> Any:
        if self._previous is MISSING:
            module = self._shadowed_module
            return type(module).forward(module, *args, **kwargs)
        return self._previous(*args, **kwargs)

    @property
    def __wrapped__(self) -> Any:
        """The forward this shadow runs: the previous instance attribute or the class's, bound."""
        if self._previous is MISSING:
            return types.MethodType(type(self._shadowed_module).forward, self._shadowed_module)
        return self._previous

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__wrapped__)

    @property
    def __name__(self) -> str:
        return "forward"

    def __repr__(self) -> str:
        return f"<forward of {type(self._shadowed_module).__name__} shadowed by {self._owner}>"


def shadow_forward(module: nn.Module, run: Run, owner: str, undo: UndoStack) -> ShadowedForward:
    """Make ``module.forward`` (called directly or through ``module(...)``) run ``run``; ``undo`` restores it.

    Args:
        module: the module.
        run: ``run(forward, *args, **kwargs)``, see :data:`Run`.
        owner: who shadows it, for messages.
        undo: receives the restoration.

    Returns:
        The shadow now in ``module.__dict__["forward"]``.
    """
    previous = module.__dict__.get("forward", MISSING)
    shadow = ShadowedForward(module, run, previous, owner)
    module.__dict__["forward"] = shadow  # an existing key keeps its place in the dict, a new one goes last
    undo.push(functools.partial(_restore_forward, module, shadow))
    return shadow


def _pass_through(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The ``run`` of a retired shadow: the previous forward, nothing else."""
    return forward(*args, **kwargs)


def _wraps(forward: Any, shadow: ShadowedForward) -> bool:
    """Whether ``forward`` calls ``shadow``, as far as can be seen without calling it: through
    ``__wrapped__`` chains (accelerate's mixed-precision and offload wrappers, ``functools.wraps``),
    bound methods' functions, ``functools.partial`` and closure cells (trl's ``add_fused_lm_head``
    keeps the forward it replaces in a closure and names the class's forward as ``__wrapped__``)."""
    pending: list[Any] = [forward]
    seen: set[int] = set()
    while pending and len(seen) < 256:  # bounded: a cycle or a huge graph must not hang detach
        current = pending.pop()
        if current is shadow:
            return True
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        function = getattr(current, "__func__", current)
        pending.extend((getattr(current, "__wrapped__", None), getattr(current, "func", None), function))
        if function is not current:
            pending.append(getattr(function, "__wrapped__", None))
        for cell in getattr(function, "__closure__", None) or ():
            try:
                pending.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    return False


def _restore_forward(module: nn.Module, shadow: ShadowedForward) -> None:
    """Put back what ``module.forward`` was before ``shadow``.

    If another library wrapped the shadow meanwhile (``accelerate.prepare`` with mixed precision
    replaces ``model.forward`` by an autocast wrapper around it), its wrapper stays, it is theirs, and
    the shadow inside it retires: it passes every call through to the previous forward, so the module
    computes its base outputs; the library's own unwrapping puts the retired shadow back, which is a
    pass-through.

    Raises:
        RuntimeError: someone replaced the shadow by a forward that does not wrap it (the adapter
            stopped running then); nothing is changed, since guessing would corrupt the module.
    """
    current = module.__dict__.get("forward", MISSING)
    if current is shadow:
        if shadow._previous is MISSING:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = shadow._previous
        return
    if current is not MISSING and _wraps(current, shadow):
        shadow._run = _pass_through
        shadow._owner = f"{shadow._owner} (detached)"
        return
    found = "removed it" if current is MISSING else f"put {current!r} in its place, which does not call it"
    raise RuntimeError(
        f"cannot restore {type(module).__name__}.forward: while {shadow._owner} was attached, someone {found} "
        "(e.g. accelerate's add_hook_to_module / remove_hook_from_module). Undo that first, then detach; "
        "the module keeps its current forward"
    )


def shadow_attribute(module: nn.Module, name: str, value: Any, undo: UndoStack) -> None:
    """Set the instance attribute ``name`` of ``module`` to ``value``; ``undo`` puts back the previous
    instance attribute, or deletes it when there was none (``__dict__`` order kept either way)."""
    previous = module.__dict__.get(name, MISSING)
    module.__dict__[name] = value
    undo.push(functools.partial(restore_attribute, module, name, previous))


def restore_attribute(module: nn.Module, name: str, previous: Any) -> None:
    """Put back ``previous`` as ``module``'s instance attribute ``name`` (:data:`MISSING`: delete it)."""
    if previous is MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous
