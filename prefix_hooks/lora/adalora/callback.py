"""``AdaLoraCallback``: the one line a ``transformers.Trainer`` user adds to run AdaLoRA's rank allocation.

The allocator scores each factor by ``|p * p.grad|``, so it must run while the gradients of the step
exist: after ``backward()`` and ``optimizer.step()``, before ``zero_grad()`` (PEFT's documented place
for ``update_and_allocate``). A hand-written loop calls ``handle.update_and_allocate(step)`` there;
``Trainer`` owns its loop, and its ``on_optimizer_step`` event is exactly that place (after the
optimizer step, before the gradients are zeroed), with ``state.global_step`` still the index of the
step being taken (0 for the first), as in PEFT's loops::

    with attach_adalora(model, AdaLoraConfig(total_step=max_steps, ...)) as handle:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback(handle)])
        trainer.train()
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prefix_hooks.core.attachment import Attachment
from prefix_hooks.core.compose import MultiAttachment
from prefix_hooks.lora.adalora.attachment import AdaLoraAttachment

__all__ = ["AdaLoraCallback"]


class AdaLoraCallback(TrainerCallback):
    """Calls ``handle.update_and_allocate(state.global_step)`` at every optimizer step of a ``Trainer``.

    Args:
        handle: the AdaLoRA adapter the Trainer trains, or the group of ``attach(model, ...)`` holding it
            (its trainable AdaLoRA part is the one allocated).

    Raises:
        TypeError: ``handle`` is neither, or the group holds no trainable AdaLoRA adapter.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback(handle)])
    """

    def __init__(self, handle: Attachment) -> None:
        self.handle = _trainable_adalora(handle)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Warn when the Trainer's step count differs from ``total_step``, which the budget schedule assumes."""
        total_step = self.handle.config.total_step
        if state.max_steps and state.max_steps != total_step:
            warnings.warn(
                f"AdaLoRA adapter {self.handle.adapter_name!r} schedules its rank budget over total_step={total_step} "
                f"steps, but this Trainer runs {state.max_steps}; set AdaLoraConfig(total_step={state.max_steps})",
                UserWarning,
                stacklevel=2,
            )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After ``optimizer.step()``, before ``zero_grad()``: the step's allocation."""
        self.handle.update_and_allocate(state.global_step)


def _trainable_adalora(handle: Attachment) -> AdaLoraAttachment:
    """``handle``, or the trainable AdaLoRA part of a group (a model takes at most one)."""
    if isinstance(handle, AdaLoraAttachment):
        return handle
    parts = handle.parts if isinstance(handle, MultiAttachment) else ()
    found = [part for part in parts if isinstance(part, AdaLoraAttachment) and not part.config.inference_mode]
    if not found:
        raise TypeError(
            f"AdaLoraCallback needs an AdaLoraAttachment, or a group holding a trainable one; got "
            f"{type(handle).__name__} {handle.adapter_name!r}"
        )
    return found[0]
