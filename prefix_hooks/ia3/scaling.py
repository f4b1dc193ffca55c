"""The hooks that apply (IA)^3 vectors, shared by every (IA)^3 adapter scaling one module.

Each scaled module gets at most two hooks, whatever the number of adapters: a forward
hook multiplying the output by the product of the regular vectors, and a forward pre-hook
multiplying the input by the product of the feed-forward vectors. Several adapters on one
module therefore multiply their vectors first and scale once, as PEFT's active adapters do.

Numerics are PEFT's: with ``l`` the product of the vectors (float32, or the base dtype when
that is float64), a regular target returns ``(base(x) * l).to(base(x).dtype)`` (the bias is
scaled too) and a feed-forward target computes ``base((x * l).to(x.dtype))``.

Merging multiplies the weight (and, for regular vectors, the bias) in place after keeping
clones of the original tensors; unmerging copies the clones back, bit-exactly. A merged
vector is left out of the hooks so nothing is scaled twice.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from prefix_hooks.core.attachment import _disabled
from prefix_hooks.core.merged_weights import register_merge_probe

lock = threading.RLock()
"""Held while (IA)^3 vectors are added to, removed from, merged into or unmerged from modules."""


@dataclass
class _Entry:
    """One adapter's vector on one module.

    The vector is looked up in its container at every use rather than held: FSDP2's
    ``fully_shard`` replaces the registered parameters (sharded ``DTensor`` between steps,
    a full tensor during forward and backward), and a held reference would be the stale
    original, silently never trained.
    """

    key: int  # id() of the owning attachment, as recorded by Attachment.disabled()
    holder: nn.ParameterList  # the attachment's registered vectors
    name: str  # this vector's name in ``holder`` ("0", "1", ...)
    feedforward: bool
    merged: bool = False

    @property
    def vector(self) -> torch.Tensor:
        """The vector as registered now: ``(out, 1)`` regular, ``(1, in)`` feed-forward."""
        vector = getattr(self.holder, self.name)
        assert isinstance(vector, torch.Tensor)
        return vector


class ModuleScaling:
    """The (IA)^3 vectors of every attached adapter on one module, and its hooks.

    Attributes:
        module: the scaled ``nn.Linear`` / ``Conv1D``.
        entries: the adapters' vectors, in attach order.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.entries: list[_Entry] = []
        # hot-path data, rebuilt by _refresh(): (attachment id, container, name) of unmerged entries
        self._outputs: tuple[tuple[int, nn.Module, str], ...] = ()
        self._inputs: tuple[tuple[int, nn.Module, str], ...] = ()
        self._merged_keys: frozenset[int] = frozenset()  # attachments whose vector is in the weight
        self._output_hook: RemovableHandle | None = None
        self._input_hook: RemovableHandle | None = None
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) clones while merged
        self._merged_trainable = False  # a merged vector requires grad: refuse training forwards

    # --- the hooks (hot path: keep them small) -------------------------------------------
    def _scale_output(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        scale = self._product(module, self._outputs)  # (out,)
        if scale is None:
            return None
        scaled = output * scale  # (..., out), in the promoted dtype
        return scaled if scaled.dtype is output.dtype else scaled.to(output.dtype)

    def _scale_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        scale = self._product(module, self._inputs)  # (in,)
        if scale is None:
            return None
        if not args:
            raise RuntimeError(
                f"(IA)^3 scales the input of {type(module).__name__} but it was called without a positional input"
            )
        x = args[0]
        scaled = x * scale  # (..., in), in the promoted dtype
        return (scaled if scaled.dtype is x.dtype else scaled.to(x.dtype), *args[1:])

    def _product(self, module: nn.Module, vectors: tuple[tuple[int, nn.Module, str], ...]) -> torch.Tensor | None:
        """The product of ``vectors`` not disabled in this thread / task, flat; None when there is none.

        Raises:
            RuntimeError: a merged vector would get no gradient, or is disabled here.
        """
        if self._merged_trainable and module.training and torch.is_grad_enabled():
            self._refuse_training()
        disabled = _disabled.get()
        if disabled and self._merged_keys and not self._merged_keys.isdisjoint(disabled):
            self._refuse_disabled_merged()
        scale: torch.Tensor | None = None
        for key, holder, name in vectors:
            if key not in disabled:
                flat = getattr(holder, name).view(-1)  # (features,)
                scale = flat if scale is None else scale * flat
        return scale

    def _refuse_disabled_merged(self) -> None:
        raise RuntimeError(
            f"an (IA)^3 vector is merged into this {type(self.module).__name__}'s weight but its adapter is disabled() "
            "in this thread / task (a task created inside the block keeps it switched off); unmerge() it, or run "
            "this forward outside the disabled() context"
        )

    def _refuse_training(self) -> None:
        raise RuntimeError(
            f"an (IA)^3 vector is merged into this {type(self.module).__name__}'s weight, so it would get no gradient; "
            "unmerge() before training (or call model.eval() / torch.no_grad() for inference)"
        )

    # --- entries --------------------------------------------------------------------------
    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self._refresh()

    def remove(self, key: int) -> None:
        """Drop the entry of attachment ``key`` (unmerging it first) and the hooks no entry needs."""
        entry = self._entry(key)
        if entry.merged:
            self.unmerge(key)
        self.entries.remove(entry)
        self._refresh()

    def _entry(self, key: int) -> _Entry:
        for entry in self.entries:
            if entry.key == key:
                return entry
        raise KeyError(f"no (IA)^3 vector of attachment {key} on {type(self.module).__name__}")

    def _refresh(self) -> None:
        live = [entry for entry in self.entries if not entry.merged]
        self._merged_trainable = any(e.merged and e.vector.requires_grad for e in self.entries)
        self._merged_keys = frozenset(e.key for e in self.entries if e.merged)
        self._outputs = tuple((e.key, e.holder, e.name) for e in live if not e.feedforward)
        self._inputs = tuple((e.key, e.holder, e.name) for e in live if e.feedforward)
        wants_output = any(not e.feedforward for e in self.entries)
        wants_input = any(e.feedforward for e in self.entries)
        if wants_output and self._output_hook is None:
            self._output_hook = self.module.register_forward_hook(self._scale_output)
        elif not wants_output and self._output_hook is not None:
            self._output_hook.remove()
            self._output_hook = None
        if wants_input and self._input_hook is None:
            self._input_hook = self.module.register_forward_pre_hook(self._scale_input)
        elif not wants_input and self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None

    # --- merging ----------------------------------------------------------------------------
    def merge(self, key: int) -> None:
        """Fold attachment ``key``'s vector into the weight (and bias) in place; no-op when merged."""
        entry = self._entry(key)
        if entry.merged:
            return
        weight, bias = _weight_and_bias(self.module)
        with torch.no_grad():
            if self._original is None:
                self._original = (weight.detach().clone(), None if bias is None else bias.detach().clone())
            _fold(self.module, weight, bias, entry)
        entry.merged = True
        self._refresh()

    def unmerge(self, key: int) -> None:
        """Take attachment ``key``'s vector out of the weight: copy the originals back, refold the others."""
        entry = self._entry(key)
        if not entry.merged or self._original is None:
            return
        weight, bias = _weight_and_bias(self.module)
        original_weight, original_bias = self._original
        with torch.no_grad():
            weight.copy_(original_weight)
            if bias is not None and original_bias is not None:
                bias.copy_(original_bias)
            entry.merged = False
            still = [e for e in self.entries if e.merged]
            for other in still:
                _fold(self.module, weight, bias, other)
        if not still:
            self._original = None
        self._refresh()


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = module.weight
    bias = getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _fold(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, entry: _Entry) -> None:
    """``weight`` (and ``bias``) times ``entry.vector``, in place, rounded once to the weight's dtype (PEFT's merge).

    nn.Linear stores ``(out, in)``, Conv1D ``(in, out)``: a regular vector scales the output
    features, a feed-forward one the input features.
    """
    flat = entry.vector.detach().view(-1)  # (out,) or (in,)
    scales_rows = entry.feedforward == isinstance(module, Conv1D)  # the vector runs along dim 0 of the weight
    scale = flat.view(-1, 1) if scales_rows else flat.view(1, -1)
    weight.copy_(weight * scale)  # computed in the promoted dtype, rounded once
    if not entry.feedforward and bias is not None:
        bias.copy_(bias * flat)  # (out,)


_scalings: weakref.WeakKeyDictionary[nn.Module, ModuleScaling] = weakref.WeakKeyDictionary()


def acquire(module: nn.Module, entry: _Entry) -> ModuleScaling:
    """Add ``entry`` to ``module``'s scaling (created, with its hooks, on first use)."""
    with lock:
        scaling = _scalings.get(module)
        if scaling is None:
            scaling = _scalings[module] = ModuleScaling(module)
        scaling.add(entry)
        return scaling


def release(module: nn.Module, key: int) -> None:
    """Remove attachment ``key``'s vector from ``module``; the last one removes the hooks."""
    with lock:
        scaling = _scalings[module]
        scaling.remove(key)
        if not scaling.entries:
            del _scalings[module]


def scaling_of(module: nn.Module) -> ModuleScaling | None:
    """The scaling of ``module`` (None when no (IA)^3 vector is attached to it)."""
    return _scalings.get(module)


def _merged_vectors(model: nn.Module, module: nn.Module) -> str | None:
    """The merge probe of (IA)^3: whether a vector is merged into ``module``'s weight (of any model)."""
    scaling = _scalings.get(module)
    return "a merged (IA)^3 vector" if scaling is not None and any(e.merged for e in scaling.entries) else None


register_merge_probe("(IA)^3", _merged_vectors)
