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

import abc
import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import Attachment, UndoStack
from prefix_hooks.core.modules_to_save import ModulesToSaveWrapper
from prefix_hooks.core.places import Place, parent_now
from prefix_hooks.core.switch import Switch
from prefix_hooks.core.targets import select_modules_to_save, task_heads

__all__ = ["SavedModules", "SavedModulesAttachment", "task_heads", "trainable_copy"]


def trainable_copy(module: nn.Module, trainable: bool) -> nn.Module:
    """A deep copy of ``module`` whose parameters have ``requires_grad=trainable`` (the original is untouched)."""
    duplicate = copy.deepcopy(module)
    duplicate.requires_grad_(trainable)
    return duplicate


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
            modules = swaps.originals(model, view, selected, "saved as a copy")
        self._saved = [(Place.of(name, module), trainable_copy(module, trainable)) for name, module in modules.items()]
        self.names = selected
        self._switch = Switch()  # what disabled() turns off in one thread / task; the wrappers hold it

    def copies(self) -> list[nn.Module]:
        """The trainable copies, in ``names`` order."""
        return [duplicate for _, duplicate in self._saved]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """PEFT's in-model names: ``<module>.modules_to_save.<adapter>.<param>``."""
        for place, duplicate in self._saved:
            for key, parameter in duplicate.named_parameters():
                yield f"{place.name}.modules_to_save.{self.adapter_name}.{key}", parameter

    def check_can_attach(self) -> None:
        """Raise if a module to save is no longer the module the copies were made from."""
        for place, _ in self._saved:
            current = parent_now(self.model, place)._modules.get(place.child_name)
            if current is not place.original:
                raise RuntimeError(
                    f"{place.name!r} is no longer the module this adapter was built for (found "
                    f"{type(current).__name__}); another adapter may have replaced it. Detach it or build the "
                    "adapter again"
                )

    def install(self, undo: UndoStack) -> None:
        """Swap a wrapper running this adapter's copy into each module's place; undo puts the original back."""
        for place, duplicate in self._saved:
            parent = parent_now(self.model, place)
            wrapper = ModulesToSaveWrapper(place.original)
            wrapper.add_copy(self.adapter_name, duplicate, switch=self._switch)
            wrapper.set_active([self.adapter_name])
            swaps.match_training(wrapper, place.original)
            parent._modules[place.child_name] = wrapper  # same key, same position
            undo.push(_put_back(parent, place))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The originals run instead of the copies inside, in the current thread (and async task) only:
        the wrappers read this adapter's :class:`~prefix_hooks.core.switch.Switch` at each forward."""
        with self._switch.off():
            yield


def _put_back(parent: nn.Module, place: Place) -> Callable[[], None]:
    """The undo of one swap (a partial, so a copy of the attached model puts back its own module)."""
    return functools.partial(_put_original_back, parent, place)


def _put_original_back(parent: nn.Module, place: Place) -> None:
    parent._modules[place.child_name] = place.original


class SavedModulesAttachment(Attachment):
    """An adapter made of one module of its own plus its :class:`SavedModules` (prefix, prompt).

    Subclasses set ``self.saved_modules`` and say which module holds the method's parameters.
    """

    saved_modules: SavedModules

    @abc.abstractmethod
    def _method_module(self) -> nn.Module:
        """The module holding the method's own parameters (the prefix encoder, the prompt encoder)."""

    def adapter_modules(self) -> list[nn.Module]:
        return [self._method_module(), *self.saved_modules.copies()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's outputs inside: the adapter and its modules to save are off in this thread
        (and async task) only; forwards elsewhere keep them."""
        with self.saved_modules.disabled(), super().disabled():
            yield
