"""AdaLoRA's orthogonal regulariser and how it reaches the model's loss.

AdaLoRA keeps ``A`` and ``B`` close to orthogonal (so ``E`` holds singular values) by adding, to the
loss the model returns::

    orth_reg_weight * mean over the factors P of every target ( || C(P) - I ||_F )
    C(A) = A @ A.T  (r, r)        C(B) = B.T @ B  (r, r)

This is what PEFT 0.21 computes (``AdaLoraModel.forward``): the Frobenius norm itself, not its
square as in the paper, averaged over the ``2 n`` matrices ``A_1, B_1, ..., A_n, B_n`` of the ``n``
targets in module order, summed in that order.

When: every call of the model that returns a ``ModelOutput`` with a ``loss`` tensor, in training
and in evaluation alike (PEFT adds it to evaluation losses too), while a trainable adapter
(``inference_mode=False``) is attached, active, and not inside its ``disabled()`` block in the
calling thread. The loss becomes ``loss + term`` in the loss's dtype; nothing else in the output
changes. Outputs without a loss, or plain tuples (``return_dict=False``), are returned as they are,
as PEFT does. Where PEFT differs: PEFT adds the term only through its task models (``task_type``
set; a plain ``PeftModel`` never adds it), adds it inside ``disable_adapter()`` too, and raises for
an adapter loaded frozen; here the rule above holds whatever the ``task_type``.

The term reaches the loss through a shadow of the root model's ``forward``
(:func:`prefix_hooks.core.shadows.shadow_forward`), so ``model(...)``, ``model.forward(...)`` and
``Trainer`` all see it, and detach removes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["add_to_loss", "orthogonal_penalty"]


def orthogonal_penalty(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | float:
    """``mean ||C(P) - I||_F`` over the ``(A, B)`` pairs of ``factors`` (see the module docstring); 0.0 for none.

    Args:
        factors: ``(A (r, in), B (out, r))`` of each target, in module order.
    """
    total: torch.Tensor | float = 0.0
    count = 0
    for a_weight, b_weight in factors:
        for covariance in (a_weight @ a_weight.T, b_weight.T @ b_weight):  # (r, r) each
            identity = torch.eye(*covariance.shape, dtype=covariance.dtype, device=covariance.device)
            total = total + torch.linalg.matrix_norm(covariance - identity, ord="fro")
            count += 1
    return total / count if count else 0.0


def add_to_loss(
    term: Callable[[], torch.Tensor | float | None], forward: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """The ``run`` of the root's shadowed forward: ``forward(*args, **kwargs)``, with ``term()`` added to its ``loss``.

    Args:
        term: the weighted regulariser, or None where it does not apply now (see the module docstring).
        forward: what ``model.forward`` was before the shadow.
    """
    outputs = forward(*args, **kwargs)
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        extra = term()
        if extra is not None:
            outputs.loss = (loss + extra).to(loss.dtype)  # ModelOutput updates its dict entry too
    return outputs
