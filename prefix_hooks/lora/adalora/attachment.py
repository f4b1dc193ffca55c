"""AdaLoRA attached in place: ``attach_adalora`` and :class:`AdaLoraAttachment`.

An AdaLoRA adapter is a LoRA adapter (:class:`~prefix_hooks.lora.attachment.LoraAttachment`: the
same swaps, freeze, modules to save, biases, activation, per-row selection, ``disabled()``, merging
and baking) whose layers are the SVD-form ones (:mod:`prefix_hooks.lora.adalora.layers`), plus:

* the rank allocator (:mod:`prefix_hooks.lora.adalora.allocator`), run by
  :meth:`AdaLoraAttachment.update_and_allocate` or, under ``Trainer``, by
  :class:`~prefix_hooks.lora.adalora.callback.AdaLoraCallback`;
* the orthogonal regulariser added to the model's loss (:mod:`prefix_hooks.lora.adalora.orthogonal`)
  by a shadow of the root's ``forward``, for a trainable adapter; detach removes it.

As in PEFT, one model takes at most one trainable AdaLoRA adapter at a time (others attach with
``inference_mode=True``), and a module cannot hold LoRA and AdaLoRA adapters together.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import torch
from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import UndoStack
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.config_fields import is_int, require_config
from prefix_hooks.core.places import Place
from prefix_hooks.core.shadows import shadow_forward
from prefix_hooks.lora.activation import active_adapters
from prefix_hooks.lora.adalora.allocator import RankAllocator, SvdTarget
from prefix_hooks.lora.adalora.config import AdaLoraConfig, RankPattern
from prefix_hooks.lora.adalora.layers import SvdLayer, wrap_svd_module
from prefix_hooks.lora.adalora.orthogonal import add_to_loss, orthogonal_penalty
from prefix_hooks.lora.adalora.targets import with_default_targets
from prefix_hooks.lora.attachment import LoraAttachment, _Target

__all__ = ["AdaLoraAttachment", "attach_adalora"]

class AdaLoraAttachment(LoraAttachment):
    """An AdaLoRA adapter for one model; see :func:`attach_adalora`.

    Each target's output becomes ``base(x) + (dropout(x) @ (A * E).T @ B.T) * lora_alpha / (ranknum + 1e-5)``.

    Attributes:
        config: the :class:`AdaLoraConfig` (with ``target_modules`` stated when it was None).
        target_names: qualified names of the adapted modules, in ``named_modules()`` order.
        modules_to_save_names: qualified names of the modules trained as full copies.
    """

    config: AdaLoraConfig

    def _make_layer(self, original: nn.Module) -> SvdLayer:
        return wrap_svd_module(original)

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default") -> None:
        config = with_default_targets(model, require_config(config, AdaLoraConfig))
        super().__init__(model, config, adapter_name)
        targets = [SvdTarget(t.place.name, self._svd_layer(t), list(range(config.init_r))) for t in self._targets]
        self._allocator = RankAllocator(config, adapter_name, targets)
        self._allocator.rank_pattern = self._allocator.read_rank_pattern(config.rank_pattern)

    def _build_target(self, place: Place) -> _Target:
        home = wrap_svd_module(place.original)
        home.switches[self.adapter_name] = self._switch
        home.add_svd_adapter(self.adapter_name, self.config)
        return _Target(place, home)

    @staticmethod
    def _svd_layer(target: _Target) -> SvdLayer:
        assert isinstance(target.home, SvdLayer)  # built by _build_target
        return target.home

    # --- parameters -------------------------------------------------------------------
    def _ranknums(self) -> set[int]:
        """The ids of this adapter's ``ranknum`` containers and parameters."""
        layers = [self._svd_layer(target) for target in self._targets]
        return {id(layer.ranknum) for layer in layers} | {id(layer.ranknum[self.adapter_name]) for layer in layers}

    def adapter_modules(self) -> list[nn.Module]:
        """LoRA's containers, less ``ranknum`` (a constant, neither trained nor saved, as in PEFT)."""
        ranknums = self._ranknums()
        return [module for module in super().adapter_modules() if id(module) not in ranknums]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``<target>.lora_A.<adapter>``, ``lora_B``, ``lora_E`` (PEFT's names) and the modules-to-save copies."""
        ranknums = self._ranknums()
        return ((name, p) for name, p in super().named_parameters() if id(p) not in ranknums)

    # --- attach / detach ----------------------------------------------------------------
    def _check_can_attach(self) -> None:
        super()._check_can_attach()
        with swaps.lock:
            state = swaps.state_of(self.model)
            if state is None:
                return
            for target in self._targets:
                swap = state.swaps.get(target.place.name)
                if swap is not None and not isinstance(swap.replacement, SvdLayer):
                    raise RuntimeError(
                        f"{target.place.name!r} holds LoRA adapters {swap.users}; an AdaLoRA adapter cannot share a "
                        "module with LoRA adapters (PEFT cannot mix them either): target other modules, or detach them"
                    )
            trainable = [
                name
                for name, other in state.adapters.items()
                if isinstance(other, AdaLoraAttachment) and not other.config.inference_mode
            ]
            if trainable and not self.config.inference_mode:
                raise ValueError(
                    f"AdaLoRA adapter {trainable[0]!r} is attached and trainable; a model supports only 1 trainable "
                    "AdaLoRA adapter (as PEFT). When using multiple adapters, set inference_mode=True for all adapters "
                    "except the one you want to train"
                )

    def _install_locked(self, undo: UndoStack) -> None:
        super()._install_locked(undo)
        if not self.config.inference_mode:
            owner = f"AdaLoRA adapter {self.adapter_name!r}"
            shadow_forward(self.model, functools.partial(add_to_loss, self._orthogonal_term), owner, undo)

    def _orthogonal_term(self) -> torch.Tensor | float | None:
        """``orth_reg_weight * penalty`` while this adapter runs in this thread, else None."""
        if self.adapter_name not in active_adapters(self.model):
            return None
        factors = [self._svd_layer(target).factors(self.adapter_name) for target in self._targets]
        return self.config.orth_reg_weight * orthogonal_penalty(
            (a_weight, b_weight) for a_weight, _, b_weight in factors
        )

    # --- rank allocation ----------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and mask the budget of step ``global_step`` (PEFT's ``update_and_allocate``).

        Call it at every optimizer step, after ``loss.backward()`` (and ``optimizer.step()``), before
        ``optimizer.zero_grad()``: the scores need the step's gradients. ``global_step`` counts from 0.
        Under ``Trainer``, :class:`~prefix_hooks.lora.adalora.callback.AdaLoraCallback` calls it.

        Raises:
            ValueError: ``global_step`` is not an int >= 0.
            RuntimeError: the adapter is merged (masking would leave the weight's copy stale), a factor
                has no gradient, or the final phase starts without a rank pattern.

        Example:
            >>> for step, batch in enumerate(batches):
            ...     model(**batch).loss.backward()
            ...     optimizer.step()
            ...     handle.update_and_allocate(step)
            ...     optimizer.zero_grad()
        """
        if not is_int(global_step) or global_step < 0:
            raise ValueError(f"global_step={global_step!r} is not accepted; expected the optimizer step, an int >= 0")
        if self.is_merged:
            raise RuntimeError(f"AdaLoRA adapter {self.adapter_name!r} is merged; unmerge() it before allocating ranks")
        self._allocator.update_and_allocate(global_step)

    def budget(self, global_step: int) -> int:
        """The number of triplets the schedule keeps at ``global_step`` (all targets together)."""
        return self._allocator.budget(global_step)[0]

    @property
    def rank_pattern(self) -> RankPattern | None:
        """The allocation's result under PEFT's in-memory keys, ``"<target>.lora_E.<adapter>" -> [kept, ...]``
        (``init_r`` flags each), or None before the first masking step."""
        return self._allocator.peft_rank_pattern(with_adapter=True)

    def saved_rank_pattern(self) -> RankPattern | None:
        """The rank pattern under the keys PEFT saves (``"<target>.lora_E"``), or None."""
        return self._allocator.peft_rank_pattern(with_adapter=False)

    def kept_rows(self, target_name: str) -> list[int]:
        """Which of the ``init_r`` original triplets the current rows of ``target_name``'s factors are."""
        return list(self._allocator_target(target_name).kept)

    def _allocator_target(self, target_name: str) -> SvdTarget:
        for target in self._allocator.targets:
            if target.name == target_name:
                return target
        raise KeyError(f"{target_name!r} is not a target of AdaLoRA adapter {self.adapter_name!r}")

    def prune_to_rank_pattern(self) -> None:
        """Keep only the triplets the rank pattern keeps, as PEFT does when it loads an allocated adapter.

        Each target's ``A``, ``E``, ``B`` become new, smaller parameters (``ranknum`` and so the
        outputs are unchanged, since the pruned triplets have ``E = 0``); targets without an entry keep
        every row. Loading calls this; a fresh adapter given a config with a ``rank_pattern`` keeps its
        full factors (PEFT's ``get_peft_model`` does the same).

        Raises:
            RuntimeError: the adapter is attached (its layers hold the current parameters).
        """
        if self.is_attached:
            raise RuntimeError(f"AdaLoRA adapter {self.adapter_name!r} is attached; prune it while detached")
        pattern = self._allocator.rank_pattern or {}
        for target in self._allocator.targets:
            flags = pattern.get(target.name)
            if flags is None:
                continue
            target.layer.keep_rows(self.adapter_name, [flags[original] for original in target.kept])
            target.kept = [original for original in target.kept if flags[original]]

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return f"AdaLoraAttachment({self.adapter_name!r}, {len(self._targets)} targets, {state})"


def attach_adalora(
    model: nn.Module, config: AdaLoraConfig | str | os.PathLike[str], adapter_name: str = "default"
) -> AdaLoraAttachment:
    """Build an AdaLoRA adapter for ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Targets are selected (LoRA's rules; ``target_modules=None`` takes the family's AdaLoRA default,
    see :mod:`prefix_hooks.lora.adalora.targets`) and the factors are built here; nothing about
    ``model`` changes until the adapter is attached.

    Args:
        model: any ``nn.Module`` (a transformers model for ``target_modules=None``).
        config: the :class:`AdaLoraConfig`; or a folder or hub id where an AdaLoRA adapter was saved
            (ours or PEFT's), loaded frozen: ``load_adapter(..., trainable=True)`` resumes training.
        adapter_name: a Python identifier naming the adapter.

    Returns:
        The (not yet attached) :class:`AdaLoraAttachment`.

    Raises:
        TypeError: ``config`` is not an :class:`AdaLoraConfig`, or a target is not a ``nn.Linear`` /
            ``Conv1D`` (or bitsandbytes linear).
        ValueError: the targets or modules to save match nothing.

    Example:
        >>> config = AdaLoraConfig(init_r=12, target_r=4, total_step=len(batches), target_modules=["q_proj", "v_proj"])
        >>> with attach_adalora(model, config) as handle:
        ...     for step, batch in enumerate(batches):
        ...         model(**batch).loss.backward()     # the loss includes the orthogonal regulariser
        ...         optimizer.step()
        ...         handle.update_and_allocate(step)
        ...         optimizer.zero_grad()
        ...     handle.save("my-adalora")               # PEFT's layout, rank_pattern included
    """
    return built_or_loaded(model, config, AdaLoraAttachment, adapter_name)
