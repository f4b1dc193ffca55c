"""``modules_to_save`` for any adapter method: whole modules trained as full copies.

PEFT's task models train a freshly initialised head (``classifier``, ``score``,
``qa_outputs``) next to every adapter method, prompt learning included, and a user may name
other modules in ``modules_to_save``. :class:`SavedModules` gives one adapter handle that
behaviour: it selects the modules (on the model as it is without adapters), keeps one
trainable copy of each (built once, kept across detach and attach, so training resumes) and,
while attached, puts a :class:`~prefix_hooks.core.modules_to_save.ModulesToSaveWrapper` in
each module's place that runs the copy. Detach puts the original module object back.
:meth:`SavedModules.disabled` switches the copies off in the current thread / async task only,
as the adapter's own ``disabled()`` does.

Parameter names follow PEFT: ``<module>.modules_to_save.<adapter>.<param>``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import UndoStack
from prefix_hooks.core.config import TaskType
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.switch import Switch
from prefix_hooks.lora.targets import TASK_MODULES_TO_SAVE, select_modules_to_save


def task_heads(task_type: TaskType | str | None) -> tuple[str, ...]:
    """The heads PEFT's task model for ``task_type`` trains implicitly; they may match nothing."""
    if task_type is None:
        return ()
    return TASK_MODULES_TO_SAVE.get(TaskType(task_type), ())


@dataclass(frozen=True)
class _Saved:
    """A module trained as a full copy: where it sits, the original and this adapter's copy."""

    name: str
    parent_path: tuple[str, ...]
    child_name: str
    original: nn.Module
    duplicate: nn.Module


class SavedModules:
    """One adapter's trainable copies of whole modules, and their swap into the model.

    Args:
        model: the model.
        names: ``modules_to_save`` as the user gave it (each entry must match a module).
        optional: names that may match nothing (see :func:`task_heads`).
        adapter_name: the owning adapter's name (the copies' key in the wrappers).
        trainable: whether the copies require grad.

    Raises:
        ValueError: an entry of ``names`` matches no module, or a selected module contains
            modules that attached LoRA adapters replaced.
    """

    def __init__(
        self, model: nn.Module, names: Iterable[str], optional: Iterable[str], adapter_name: str, trainable: bool
    ) -> None:
        self.model = model
        self.adapter_name = adapter_name
        with swaps.lock:
            view = swaps.clean_view(model)  # the model without adapters: original names and modules
            selected = select_modules_to_save(view, names, optional=optional)
            modules = dict(view.named_modules())
            real = {id(module) for module in model.modules()}
            state = swaps.state_of(model)
            real.update(id(swap.original) for swap in (state.swaps.values() if state else ()))
            for name in selected:
                if id(modules[name]) not in real:
                    raise ValueError(
                        f"modules_to_save entry {name!r} contains modules that attached LoRA adapters replaced; "
                        "it cannot be saved as a copy while they are attached"
                    )
        self._saved: list[_Saved] = []
        for name in selected:
            *parent, child = name.split(".")
            duplicate = copy.deepcopy(modules[name])
            duplicate.requires_grad_(trainable)
            self._saved.append(_Saved(name, tuple(parent), child, modules[name], duplicate))
        self.names = selected
        self._switch = Switch()  # what disabled() turns off in one thread / task; the wrappers hold it

    def copies(self) -> list[nn.Module]:
        """The trainable copies, in ``names`` order."""
        return [saved.duplicate for saved in self._saved]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """PEFT's in-model names: ``<module>.modules_to_save.<adapter>.<param>``."""
        for saved in self._saved:
            for key, parameter in saved.duplicate.named_parameters():
                yield f"{saved.name}.modules_to_save.{self.adapter_name}.{key}", parameter

    def check_can_attach(self) -> None:
        """Raise if a module to save is no longer the module the copies were made from."""
        for saved in self._saved:
            current = self._parent_of(saved)._modules.get(saved.child_name)
            if current is not saved.original:
                raise RuntimeError(
                    f"{saved.name!r} is no longer the module this adapter was built for (found "
                    f"{type(current).__name__}); another adapter may have replaced it. Detach it or build the "
                    "adapter again"
                )

    def install(self, undo: UndoStack) -> None:
        """Swap a wrapper running this adapter's copy into each module's place; undo puts the original back."""
        for saved in self._saved:
            parent = self._parent_of(saved)
            wrapper = ModulesToSaveWrapper(saved.original)
            wrapper.add_copy(self.adapter_name, saved.duplicate, switch=self._switch)
            wrapper.set_active([self.adapter_name])
            swaps.match_training(wrapper, saved.original)
            parent._modules[saved.child_name] = wrapper  # same key, same position
            undo.push(_put_back(parent, saved))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The originals run instead of the copies inside, in the current thread (and async task) only:
        the wrappers read this adapter's :class:`~prefix_hooks.core.switch.Switch` at each forward."""
        with self._switch.off():
            yield

    def _parent_of(self, saved: _Saved) -> nn.Module:
        parent = self.model
        for depth, key in enumerate(saved.parent_path):
            child = parent._modules.get(key)
            if child is None:
                raise RuntimeError(
                    f"{saved.name!r}: the model has no module {'.'.join(saved.parent_path[: depth + 1])!r} any more"
                )
            parent = child
        return parent


def _put_back(parent: nn.Module, saved: _Saved) -> Callable[[], None]:
    """The undo of one swap (a partial, so a copy of the attached model puts back its own module)."""
    return functools.partial(_put_original_back, parent, saved)


def _put_original_back(parent: nn.Module, saved: _Saved) -> None:
    parent._modules[saved.child_name] = saved.original
