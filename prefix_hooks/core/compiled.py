"""Attaching to a model that ``torch.compile`` has already seen.

Dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards`` is True): a graph traced before an
adapter's hooks were added keeps running without them, silently, unless something else the
graph guards on changed too (a parameter's ``requires_grad``, a swapped submodule, the
attention registry, the inputs). Removing hooks that existed when the graph was traced does
fail its guards, so detaching needs nothing; attaching does.

So attach looks for the marks compiling leaves on the model and, if it finds one, throws
away Dynamo's compiled code (``torch._dynamo.reset()``): the compiled object's next call
traces again, now with the adapter. The marks, on the model or any submodule:

- ``torch.compile(model)`` returns an ``OptimizedModule`` wrapper and marks the model
  itself (``_is_torch_compile`` in its ``__dict__``), so either object may be passed later;
- ``model.compile()`` sets ``model._compiled_call_impl``;
- ``generate()`` with a static cache on an accelerator keeps ``model._compiled_call``;
- a submodule replaced by its ``torch.compile`` wrapper.

A function compiled around the model (``torch.compile(train_step)``) leaves no mark: attach
before compiling it, or call ``torch._dynamo.reset()`` after attaching.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

from torch import nn

logger = logging.getLogger(__name__)

_MARKS: dict[str, str] = {
    "_is_torch_compile": "torch.compile({})",
    "_compiled_call_impl": "{}.compile()",
    "_compiled_call": "{}.get_compiled_call() (generate with a compiled static cache)",
}


def _dynamo() -> ModuleType | None:
    """``torch._dynamo`` if something imported it (nothing can be compiled otherwise); importing it
    here would cost seconds."""
    return sys.modules.get("torch._dynamo")


def compile_marks(model: nn.Module) -> list[str]:
    """How ``model`` or its submodules were compiled, one description each (empty: never).

    Args:
        model: any module; submodules are searched too (``named_modules``).

    Returns:
        e.g. ``["torch.compile(model)", "model.model.layers.0.compile()"]``, in module order.
    """
    dynamo = _dynamo()
    if dynamo is None:
        return []
    marks: list[str] = []
    for name, module in model.named_modules():
        path = f"model.{name}" if name else "model"
        if isinstance(module, dynamo.OptimizedModule):
            marks.append(f"{path} is a torch.compile wrapper")
            continue
        own = vars(module)
        for attribute, template in _MARKS.items():
            if own.get(attribute) not in (None, False):
                marks.append(template.format(path))
    return marks


def is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` has seen ``model`` or one of its submodules (see :func:`compile_marks`)."""
    return bool(compile_marks(model))


def prepare_for_attach(model: nn.Module) -> None:
    """Make an adapter about to be attached to ``model`` take effect in its compiled forms.

    Called by :meth:`prefix_hooks.Attachment.attach` before anything is mutated.

    Raises:
        TypeError: ``model`` is the ``OptimizedModule`` returned by ``torch.compile(model)``;
            attach to the model itself (``compiled._orig_mod``), then call the compiled object.
    """
    dynamo = _dynamo()
    if dynamo is None:
        return
    if isinstance(model, dynamo.OptimizedModule):
        inner = type(model._orig_mod).__name__
        raise TypeError(
            f"got the torch.compile wrapper of a {inner} (OptimizedModule); attach to the model itself "
            "(compiled._orig_mod), preferably before compiling it. The compiled object then runs the adapter"
        )
    marks = compile_marks(model)
    if marks:
        # hooks added after tracing are not guarded: drop every compiled graph so the next call retraces
        dynamo.reset()
        logger.info("%s: reset torch._dynamo so compiled calls trace the adapter", ", ".join(marks))
