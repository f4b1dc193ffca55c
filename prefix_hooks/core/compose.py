"""Several adapter methods on one model in one block: ``attach(model, *configs)``.

>>> with attach(model, PrefixTuningConfig(num_virtual_tokens=8), LoraConfig(r=8)) as handle:
...     trainer.train()             # the prefix encoder and the LoRA matrices both train

Every part is built (and validated) before anything is attached, the parts attach in the
order given and detach in reverse, and a failure while attaching one part detaches the
parts already attached: the model is either fully adapted or untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from prefix_hooks.core.attachment import Attachment, UndoStack
from prefix_hooks.core.checkpoints import checkpoint_format

Builder = Callable[[nn.Module, Any, str], Attachment]
"""``(model, config, adapter_name) -> not yet attached handle``."""

_BUILDERS: dict[type, Builder] = {}
"""Config class -> builder; each method package registers its own when imported."""


def register_method(config_type: type, builder: Builder) -> None:
    """Let :func:`attach` build handles from configs of ``config_type`` with ``builder``."""
    _BUILDERS[config_type] = builder


def _builder_for(config: object) -> Builder:
    for config_type in type(config).__mro__:  # the most specific registered class (AdaLoraConfig is a LoraConfig)
        if config_type in _BUILDERS:
            return _BUILDERS[config_type]
    accepted = ", ".join(sorted(config_type.__name__ for config_type in _BUILDERS))
    raise TypeError(f"cannot attach a {type(config).__name__}; expected one of {accepted}, or an Attachment")


class MultiAttachment(Attachment):
    """Several handles on one model, attached and detached as one (see :func:`attach`).

    Attributes:
        parts: the handles, in attach order.
    """

    def __init__(self, model: nn.Module, parts: Sequence[Attachment], adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        if not parts:
            raise ValueError("attach() needs at least one config or handle")
        for part in parts:
            if part.model is not model:
                raise ValueError(f"the handle {part.adapter_name!r} belongs to another model")
        if len({id(part) for part in parts}) != len(parts):
            raise ValueError("the same handle is given twice")
        self.parts = tuple(parts)

    def _check_can_attach(self) -> None:
        for part in self.parts:
            if part.is_attached:
                raise RuntimeError(f"{type(part).__name__} {part.adapter_name!r} is already attached on its own")

    def _install(self, undo: UndoStack) -> None:
        for part in self.parts:
            part.attach()
            undo.push(part.detach)

    def adapter_modules(self) -> list[nn.Module]:
        return [module for part in self.parts for module in part.adapter_modules()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """All parts compute their base outputs inside (per thread, as each part's ``disabled()``)."""
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.disabled())
            yield


def attach(
    model: nn.Module, *configs: Any, adapter_name: str = "default", trainable: bool = False
) -> MultiAttachment:
    """Build one handle per config (or take the given handles) and group them.

    Args:
        model: the model every part adapts.
        *configs: adapter configs (``PrefixTuningConfig``, ``LoraConfig``, ...), handles
            built for ``model``, or saved adapter folders / hub ids (a ``str`` or
            ``os.PathLike``, loaded frozen by :func:`~prefix_hooks.checkpoint.load_adapter`; a
            folder of several adapters adds each of them); at most one prefix.
        adapter_name: the name every part built here gets (parts loaded from a folder of
            several adapters keep their saved names).
        trainable: load saved adapters in their trainable form (see ``load_adapter``); configs
            and handles are unaffected.

    Returns:
        A not yet attached :class:`MultiAttachment`: use ``with``, ``@`` or ``.attach()``.

    Raises:
        TypeError: a config of a kind with no registered method.
        ValueError: a config that does not fit the model (nothing is attached).
    """
    parts: list[Attachment] = []
    for config in configs:
        if isinstance(config, Attachment):
            parts.append(config)
        elif isinstance(config, (str, os.PathLike)):
            loaded = checkpoint_format().load_adapter(model, config, adapter_name, trainable=trainable)
            parts.extend(loaded.parts if isinstance(loaded, MultiAttachment) else [loaded])
        else:
            parts.append(_builder_for(config)(model, config, adapter_name))
    return MultiAttachment(model, parts, adapter_name)
