"""Per-thread switches for adapters that live in shared modules.

LoRA layers and modules-to-save wrappers are shared by every thread that runs the model, yet a
handle's ``disabled()`` must switch its adapter off in the calling thread (and async task) only,
as a prefix's does. Each handle owns a :class:`Switch`; a layer keeps it next to the adapter's
name and, at each forward, leaves the adapter out while the switch is off in the current
context. The switches that are off live in one :class:`~contextvars.ContextVar` (a set of ids),
so a forward pays one ``ContextVar.get()`` and nothing more while no switch is off: no lock, no
tensor operation.

Layers hold the switch object, not its id, so ``copy.deepcopy`` of an attached model that also
copies the handle ties each copied layer to the copied handle's switch.

Example::

    switch = Switch()
    layer.switches["sql"] = switch
    with switch.off():       # this thread / task: layer(x) leaves "sql" out
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_OFF: ContextVar[frozenset[int]] = ContextVar("prefix_hooks_lora_switched_off", default=frozenset())


def switched_off() -> frozenset[int]:
    """The ids of the switches that are off in the current thread / async task (usually empty)."""
    return _OFF.get()


class Switch:
    """One handle's on/off switch, read by the shared layers that hold its adapter."""

    @contextmanager
    def off(self) -> Iterator[None]:
        """Switched off inside the block, in the current thread (and async task) only; blocks nest."""
        token = _OFF.set(_OFF.get() | {id(self)})
        try:
            yield
        finally:
            _OFF.reset(token)

    def is_off(self) -> bool:
        """Whether the switch is off in the current thread / async task."""
        return id(self) in _OFF.get()
