"""Trainable full copies of whole modules (``modules_to_save``), swapped in beside an adapter.

A :class:`ModulesToSaveWrapper` takes the place of one module of the model (a freshly
initialised classification head, say) while LoRA adapters are attached. It keeps the
original module, untouched, as ``original_module`` and one trainable copy per adapter as
``modules_to_save.<adapter>`` (PEFT's names, so PEFT checkpoints load by key). The
forward runs the copy of the active adapter, else the original; an adapter whose handle's
``disabled()`` block is open in the calling thread (or async task) runs the original there
only; under a per-row selection (:mod:`prefix_hooks.core.rows`) each row runs its adapter's copy.

The copies belong to the adapter handle that made them (they survive detach and re-attach):
a LoRA handle shares one wrapper among its adapters (:mod:`prefix_hooks.core.swaps`), other
methods get one each (:mod:`prefix_hooks.core.saved_modules`); the wrapper only borrows them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prefix_hooks.core.rows import BASE_ROW, current_adapter_rows
from prefix_hooks.core.switch import Switch, switched_off

_OWN_ATTRIBUTES = frozenset({"original_module", "modules_to_save", "active_adapters", "switches"})


class ModulesToSaveWrapper(nn.Module):
    """Stands in for ``original_module``, running an adapter's trainable copy of it.

    Attributes:
        original_module: the module it replaced (the very same object, never modified).
        modules_to_save: adapter name -> that adapter's copy of the module.
        active_adapters: adapters whose copy may run (at most one at a time in a thread).
        switches: adapter name -> its owner's :class:`~prefix_hooks.core.switch.Switch`, which
            the owner's ``disabled()`` turns off in one thread / async task.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.switches: dict[str, Switch] = {}

    def add_copy(self, adapter_name: str, copy: nn.Module, switch: Switch | None = None) -> None:
        """Lend ``copy`` to the wrapper as ``adapter_name``'s module (not active until :meth:`set_active`).

        ``switch``: the owner's switch; while it is off in a thread, that thread runs the original.
        """
        if adapter_name in self.modules_to_save:
            raise ValueError(f"{adapter_name!r} already has a copy of this module")
        self.modules_to_save[adapter_name] = copy
        if switch is not None:
            self.switches[adapter_name] = switch

    def remove_copy(self, adapter_name: str) -> None:
        """Take ``adapter_name``'s copy back (the copy itself is not changed)."""
        del self.modules_to_save[adapter_name]
        self.switches.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_active(self, names: list[str]) -> None:
        """Make the copies of ``names`` (those this wrapper holds) the active ones."""
        self.active_adapters[:] = [name for name in names if name in self.modules_to_save]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters holding a copy, in the order they were added."""
        return tuple(self.modules_to_save)

    def running_adapters(self) -> list[str]:
        """The active adapters not switched off in the calling thread / async task."""
        active = self.active_adapters
        off = switched_off()
        if not off or not active:
            return active
        switches = self.switches
        return [name for name in active if name not in switches or id(switches[name]) not in off]

    def current_module(self) -> nn.Module:
        """The module a forward without per-row selection runs here: the running adapter's copy or the original.

        Raises:
            RuntimeError: several running adapters have a copy (which one is meant is unclear).
        """
        running = self.running_adapters()
        if len(running) > 1:
            raise RuntimeError(
                f"adapters {running} each have a trainable copy of this module and are all active; "
                "activate one of them (handle.activate()) or disable the others"
            )
        return self.modules_to_save[running[0]] if running else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = current_adapter_rows()
        if rows is None:
            return self.current_module()(*args, **kwargs)
        return self._forward_rows(rows, *args, **kwargs)

    def _forward_rows(self, rows: tuple[str, ...], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``b`` of ``x`` (B, ...) through ``rows[b]``'s copy (the original for the base or a
        name without a copy); other arguments are passed whole to every call."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"{len(rows)} adapter row names were given for a batch of {x.shape[0]} rows")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(rows):
            key = name if name in self.modules_to_save else BASE_ROW
            groups.setdefault(key, []).append(row)
        outputs, order = [], []
        for name, indices in groups.items():
            module = self.original_module if name == BASE_ROW else self.modules_to_save[name]
            index = torch.tensor(indices, device=x.device)
            outputs.append(module(x.index_select(0, index), *args, **kwargs))  # (rows of the group, ...)
            order.extend(indices)
        stacked = torch.cat(outputs)  # (B, ...) grouped by adapter
        inverse = torch.argsort(torch.tensor(order, device=stacked.device))
        return stacked.index_select(0, inverse)  # (B, ...) in the batch's order

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes of the module it holds (``self.score.weight``): answer for it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN_ATTRIBUTES or name.startswith("__"):
                raise
        modules = self.__dict__["_modules"]
        running = self.running_adapters() if "switches" in self.__dict__ else ()
        target = modules["modules_to_save"][running[0]] if len(running) == 1 else modules["original_module"]
        return getattr(target, name)
