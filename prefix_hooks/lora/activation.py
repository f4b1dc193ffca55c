"""Which LoRA adapters of a model run: the model-wide active set and a per-row choice.

Every LoRA adapter attached to a model joins its active set; :func:`set_active_adapters`
narrows it (shared layers read it at each forward, see :mod:`prefix_hooks.core.swaps`).
:func:`adapter_rows` gives each batch row its own adapter instead, for the forwards inside the
block, as PEFT's ``adapter_names=[...]`` forward keyword does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.rows import adapter_rows_context


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active LoRA adapters of ``model`` (in that order; ``[]`` = none).

    Raises:
        ValueError: a name is not a LoRA adapter attached to ``model``.
        RuntimeError: a merged adapter would become inactive (unmerge it first).
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of adapter names, got the string {names!r}")
    with swaps.lock:
        state = swaps.state_of(model)
        if state is None:
            raise ValueError(f"no LoRA adapter is attached to {type(model).__name__}; cannot activate {list(names)}")
        attached = dict(state.adapters)
        unknown = [name for name in names if name not in attached]
        if unknown:
            raise ValueError(
                f"{unknown} are not LoRA adapters attached to {type(model).__name__}; attached: {sorted(attached)}"
            )
        for name, attachment in attached.items():
            if attachment.is_merged and name not in names:
                raise RuntimeError(f"LoRA adapter {name!r} is merged; unmerge() it before deactivating it")
        state.active = list(dict.fromkeys(names))
        state.refresh()


def active_adapters(model: nn.Module) -> list[str]:
    """The active LoRA adapters of ``model`` that run in this thread / task (not inside their
    ``disabled()`` block here), in order."""
    with swaps.lock:
        state = swaps.state_of(model)
        return state.effective_active() if state is not None else []


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Give each batch row its own LoRA adapter for the forwards run inside the block.

    Row ``b`` gets the adapter named ``names[b]`` (``"__base__"``: no adapter), whatever the
    active set. The same works as a forward keyword, ``model(**batch, adapter_names=names)``;
    ``model.generate()`` rejects keywords its model does not declare, so for generation use
    ``with adapter_rows(model, names): model.generate(...)``.

    Raises:
        ValueError / TypeError: a name is not an adapter attached to ``model`` (checked here),
            or, at forward time, the number of names is not the batch size.
    """
    with swaps.lock:
        swaps.check_row_names(model, swaps.state_of(model), names)
    with adapter_rows_context(names):
        yield
