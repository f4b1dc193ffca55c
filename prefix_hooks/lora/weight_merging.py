"""Merging a LoRA layer's adapters into its base weight, and putting the original back exactly.

:class:`WeightMerging` is the base of :class:`~prefix_hooks.lora.lora_layer.LoraLayer` that owns the
base weight's state: :meth:`~WeightMerging.merge` saves a clone of the weight before the first fold
and folds each adapter in place (``W + dW``; ``g * (W + dW)`` for a DoRA adapter, ``g`` its
magnitude over the column norm of the unmerged weight); :meth:`~WeightMerging.unmerge` copies the
clone back, so the weight returns bit for bit (never by subtraction). The DoRA scale is computed
here for the forward too, so merging and the forward agree.
"""

from __future__ import annotations

import torch
from torch import nn

from prefix_hooks.lora.dora import DoraMagnitude, column_norm, magnitude_scale, merged_weight


class WeightMerging(nn.Module):
    """Merge / unmerge over a layer's base weight; :class:`~prefix_hooks.lora.lora_layer.LoraLayer` provides the rest.

    Attributes (set by the layer):
        active_adapters, merged_adapters: adapter names; the merged ones are in the weight.
        lora_magnitude_vector: DoRA adapter name -> its magnitude module.
        _original_weight: the clone taken before the first merge, ``None`` while unmerged.
        _out_axis: the weight's output-feature axis (DoRA's norm is per output feature).
    """

    active_adapters: list[str]
    merged_adapters: list[str]
    lora_magnitude_vector: nn.ModuleDict
    _original_weight: torch.Tensor | None
    _out_axis: int

    def base_weight(self) -> torch.Tensor:
        """The wrapped module's weight (the layer defines it)."""
        raise NotImplementedError

    def _check_known(self, name: str) -> None:
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        """Raise ValueError if the base weight cannot absorb a delta."""

    def _delta_weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, names: list[str] | tuple[str, ...] | None = None) -> None:
        """Fold adapters into ``base_layer.weight`` in place (module objects and state-dict keys stay).

        Args:
            names: adapters to merge; None = the active ones. Already merged ones are skipped.

        Raises:
            KeyError: an unknown name. ValueError: the layer cannot be merged (Conv2d with groups > 1).
        """
        todo = list(self.active_adapters if names is None else names)
        for name in todo:
            self._check_known(name)
        todo = [name for name in dict.fromkeys(todo) if name not in self.merged_adapters]
        if not todo:
            return
        self._check_mergeable()
        weight = self.base_weight()
        with torch.no_grad():
            if self._original_weight is None:
                self._original_weight = weight.detach().clone()
            for name in todo:
                self.fold(name, weight)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore ``base_layer.weight`` bit-exactly by copying the saved original back (no-op if unmerged)."""
        if self._original_weight is None:
            return
        with torch.no_grad():
            self.base_weight().copy_(self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout and shape, float32 (keeps the autograd graph).

        For a DoRA adapter too (PEFT's ``get_delta_weight``): the magnitude acts on top, see :meth:`fold`.
        """
        self._check_known(name)
        return self._delta_weight(name)

    def fold(self, name: str, weight: torch.Tensor) -> None:
        """Fold adapter ``name`` into ``weight`` (this layer's base weight, which may hold earlier merged
        adapters) in place, without gradient: ``W + dW`` for LoRA, ``g * (W + dW)`` for DoRA, with ``g``
        from the unmerged weight (:meth:`unmerged_weight`), as the forward computes it.
        """
        self._check_known(name)
        with torch.no_grad():
            delta = self._delta_weight(name).to(weight.device)
            if name not in self.lora_magnitude_vector:
                weight.add_(delta)
                return
            scale = self._magnitude_scale(name).to(weight.device)
            weight.copy_(merged_weight(weight, delta, scale, self._out_axis))

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter: the saved original while merged, else the live
        weight (as a dense tensor: dequantised for bitsandbytes)."""
        return self._dense_weight() if self._original_weight is None else self._original_weight

    # ------------------------------------------------------------------ DoRA
    def _magnitude_scale(self, name: str) -> torch.Tensor:
        """``g = m / ||W + dW||_c`` of DoRA adapter ``name``, shaped like its magnitude; the norm is a constant."""
        with torch.no_grad():
            norm = self._column_norm(name, self.unmerged_weight())
        magnitude = self.lora_magnitude_vector[name]
        assert isinstance(magnitude, DoraMagnitude)
        return magnitude_scale(magnitude.weight, norm)

    def _column_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W + scaling * B @ A||_c`` per output feature, float32, ``(out,)``."""
        delta = self._delta_weight(name)
        return column_norm(weight.to(delta.device, delta.dtype) + delta, self._out_axis)  # delta is float32

    def _dense_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor (quantised layers dequantise it)."""
        return self.base_weight()
