"""When is a tensor computed from parameters out of date? A key that changes when they do.

Adapters memoize what they compute from their parameters between forwards (the folded prefix
projection, a P-tuning head's output, per-layer prefix views), so that ``generate()`` does not
redo it every token. A parameter's ``_version`` counter moves with every in-place change made
through autograd-visible ops (``copy_``, SGD, foreach AdamW), but fused optimizers
(``torch.optim.AdamW(fused=True)``, the Trainer's default on recent versions) update the
storage without touching it. :func:`acquire` therefore registers a global optimizer
post-step hook that counts every ``torch.optim`` step while any adapter is attached, and
:func:`parameter_key` folds that count into the key. Memos must also be dropped when their
adapter is attached (steps taken while nothing is attached are not counted).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

_lock = threading.Lock()
_users = 0
_handle: RemovableHandle | None = None
_steps = 0


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _steps
    _steps += 1


def acquire() -> None:
    """Count optimizer steps from now on (refcounted: the first user registers the hook)."""
    global _users, _handle
    with _lock:
        if _users == 0:
            _handle = register_optimizer_step_post_hook(_count_step)
        _users += 1


def release() -> None:
    """Undo one :func:`acquire`; the last one removes the global hook."""
    global _users, _handle
    with _lock:
        if _users == 0:
            raise RuntimeError("parameter_versions.release() without acquire()")
        _users -= 1
        if _users == 0 and _handle is not None:
            _handle.remove()
            _handle = None


def optimizer_steps() -> int:
    """Optimizer steps counted so far (only while acquired)."""
    return _steps


def parameter_key(parameters: Iterable[torch.Tensor]) -> tuple[object, ...]:
    """Identity, version, dtype and device of each parameter, and the optimizer step count:
    equal keys mean the values computed from ``parameters`` are still current."""
    return (_steps, *((id(p), p._version, p.dtype, p.device) for p in parameters))
