"""AdaLoRA's rank allocator: importance scores, the budget schedule and the masks, as PEFT 0.21 computes them.

At every optimizer step (after ``backward()``, before ``zero_grad()``; PEFT's
``update_and_allocate``), for every factor ``p`` of the adapter (``A``, ``B``, ``E`` of each target)::

    I      = |p * p.grad|                                 sensitivity, elementwise
    I_bar  = beta1 * I_bar + (1 - beta1) * I              smoothed sensitivity
    U_bar  = beta2 * U_bar + (1 - beta2) * |I - I_bar|    its uncertainty
    s(p)   = I_bar * U_bar                                elementwise score

A triplet ``i`` of a target scores ``s(E)_i + mean_j s(A)_ij + mean_j s(B)_ji``. With ``n`` targets,
``b0 = init_r * n`` and ``bT = target_r * n``, the budget at step ``t`` is::

    t <= tinit:                      b0
    tinit < t < total_step - tfinal: int((b0 - bT) * (1 - (t - tinit) / (total_step - tfinal - tinit))**3 + bT)

and every ``deltaT`` steps in that phase the ``b0 - budget`` lowest-scoring triplets of the whole
model (every triplet scoring at or below the ``(b0 - budget)``-th smallest score) get ``E_i = 0``
(they may grow back when trained; masking repeats). At ``t = total_step - tfinal`` the final mask
for budget ``bT`` is taken from the scores so far and recorded as the rank pattern; after it, each
step re-applies that pattern. The rank pattern is ``"<target>.lora_E.<adapter>" -> [kept, ...]``,
PEFT's in-memory keys.

Where PEFT fails, this allocator does what the schedule means: a step whose budget is the whole
current rank masks nothing (PEFT's ``kthvalue`` raises for ``k = 0``), and the factors of a loaded,
already pruned adapter are scored on the triplets they still have (``b0`` is still ``init_r * n``,
so the triplets pruned at load count as masked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefix_hooks.lora.adalora.config import AdaLoraConfig, RankPattern
from prefix_hooks.lora.adalora.layers import SvdLayer

__all__ = ["RankAllocator", "SvdTarget"]


@dataclass
class SvdTarget:
    """One target of the adapter: its qualified name, the layer holding its factors, and which of the
    ``init_r`` original triplets its current rows are (all of them until a load prunes some).
    """

    name: str
    layer: SvdLayer
    kept: list[int]


@dataclass
class _Scores:
    """The smoothed sensitivity and uncertainty of one factor."""

    sensitivity: torch.Tensor
    uncertainty: torch.Tensor


class RankAllocator:
    """The allocation state of one AdaLoRA adapter; see the module docstring for the maths.

    Args:
        config: the adapter's config (schedule, betas, ``init_r``, ``target_r``).
        adapter_name: the adapter's name in the layers.
        targets: the adapter's targets, in the model's module order.

    Attributes:
        rank_pattern: target name -> ``init_r`` flags (kept triplets), or None before the first mask.
    """

    def __init__(self, config: AdaLoraConfig, adapter_name: str, targets: Sequence[SvdTarget]) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.targets = list(targets)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self._scores: dict[tuple[str, str], _Scores] = {}

    # --- the budget ------------------------------------------------------------------------
    @property
    def initial_budget(self) -> int:
        """``init_r * n``: the triplets of all targets before any pruning."""
        return self.config.init_r * len(self.targets)

    @property
    def target_budget(self) -> int:
        """``target_r * n``."""
        return self.config.target_r * len(self.targets)

    def budget(self, step: int) -> tuple[int, bool]:
        """The budget at ``step`` and whether this step masks (PEFT's ``budget_schedule``)."""
        config = self.config
        total_step = _total_step(config)
        if step <= config.tinit:
            return self.initial_budget, False
        if step > total_step - config.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - config.tinit) / (total_step - config.tfinal - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % config.deltaT == 0

    # --- one step ---------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Update the scores and mask for step ``global_step`` (see the module docstring).

        Raises:
            RuntimeError: a factor has no gradient (call between ``backward()`` and ``zero_grad()``),
                or the final phase is reached without a rank pattern.
        """
        final_step = _total_step(self.config) - self.config.tfinal
        if global_step < final_step:
            self._update_scores()
            budget, masks = self.budget(global_step)
            if masks:
                self.rank_pattern = self._mask_to_budget(budget)
        elif global_step == final_step:
            self.rank_pattern = self._mask_to_budget(self.target_budget)
            self._scores.clear()
        else:
            self._mask_with_pattern()

    def _factors(self, target: SvdTarget) -> dict[str, nn.Parameter]:
        a_weight, e_weight, b_weight = target.layer.factors(self.adapter_name)
        return {"A": a_weight, "B": b_weight, "E": e_weight}  # PEFT's order

    def _update_scores(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for target in self.targets:
                for kind, factor in self._factors(target).items():
                    if factor.grad is None:
                        raise RuntimeError(
                            f"update_and_allocate needs the gradients of AdaLoRA adapter {self.adapter_name!r}, but "
                            f"{target.name}.lora_{kind}.{self.adapter_name} has none; call it after loss.backward() "
                            "and before optimizer.zero_grad()"
                        )
                    key = (target.name, kind)
                    scores = self._scores.get(key)
                    if scores is None or scores.sensitivity.shape != factor.shape:
                        scores = self._scores[key] = _Scores(torch.zeros_like(factor), torch.zeros_like(factor))
                    sensitivity = (factor * factor.grad).abs().detach()
                    scores.sensitivity = beta1 * scores.sensitivity + (1 - beta1) * sensitivity
                    scores.uncertainty = (
                        beta2 * scores.uncertainty + (1 - beta2) * (sensitivity - scores.sensitivity).abs()
                    )

    def _triplet_scores(self, target: SvdTarget) -> torch.Tensor:
        """``s(E)_i + mean_j s(A)_ij + mean_j s(B)_ji`` of each current row, ``(r,)``."""

        def score(kind: str) -> torch.Tensor:
            scores = self._scores.get((target.name, kind))
            if scores is None:
                raise RuntimeError(
                    f"AdaLoRA adapter {self.adapter_name!r} has no importance scores yet: call "
                    "update_and_allocate(global_step) at every optimizer step from the first one"
                )
            return scores.sensitivity * scores.uncertainty

        of_a = torch.mean(score("A"), dim=1, keepdim=True)  # (r, 1)
        of_b = torch.mean(score("B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
        of_ab = torch.cat([of_a, of_b], dim=1).sum(dim=1, keepdim=False)  # (r,)
        return score("E").view(-1) + of_ab.view(-1)  # (r,)

    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``E`` of the lowest-scoring triplets so that ``budget`` remain; the new rank pattern."""
        scores = [self._triplet_scores(target) for target in self.targets]  # each (r_t,)
        current = sum(score.numel() for score in scores)
        to_mask = current - budget  # current == initial_budget unless a load pruned some
        threshold = torch.kthvalue(torch.cat(scores), k=to_mask)[0].item() if to_mask > 0 else -math.inf
        pattern = {}
        with torch.no_grad():
            for target, score in zip(self.targets, scores):
                pruned = (score <= threshold).view(-1, 1)  # (r, 1)
                self._factors(target)["E"].masked_fill_(pruned, 0.0)
                pattern[target.name] = self._full_pattern(target, (~pruned).view(-1).tolist())
        return pattern

    def _full_pattern(self, target: SvdTarget, kept_rows: list[bool]) -> list[bool]:
        """The ``init_r`` flags of a target whose current rows (the original triplets ``target.kept``)
        keep ``kept_rows``."""
        full = [False] * self.config.init_r
        for row, original in enumerate(target.kept):
            full[original] = kept_rows[row]
        return full

    def _mask_with_pattern(self) -> None:
        if self.rank_pattern is None:
            final_step = _total_step(self.config) - self.config.tfinal
            raise RuntimeError(
                f"AdaLoRA adapter {self.adapter_name!r} reached the final phase without a rank pattern: the final "
                f"allocation runs at global_step = total_step - tfinal = {final_step}"
            )
        with torch.no_grad():
            for target in self.targets:
                flags = self.rank_pattern.get(target.name)
                if flags is None:
                    continue
                kept = torch.tensor([flags[original] for original in target.kept], dtype=torch.bool)  # (r,)
                factor = self._factors(target)["E"]
                factor.masked_fill_(~kept.to(factor.device).view(-1, 1), 0.0)

    # --- rank patterns in PEFT's form --------------------------------------------------------
    def pattern_key(self, target_name: str, with_adapter: bool = True) -> str:
        """PEFT's key of a target: ``<target>.lora_E.<adapter>`` in memory, ``<target>.lora_E`` in files."""
        return f"{target_name}.lora_E.{self.adapter_name}" if with_adapter else f"{target_name}.lora_E"

    def peft_rank_pattern(self, with_adapter: bool = True) -> RankPattern | None:
        """The rank pattern under PEFT's keys (see :meth:`pattern_key`), or None."""
        if self.rank_pattern is None:
            return None
        return {self.pattern_key(name, with_adapter): list(flags) for name, flags in self.rank_pattern.items()}

    def read_rank_pattern(self, pattern: RankPattern | None) -> dict[str, list[bool]] | None:
        """``pattern`` (PEFT's keys, with or without the adapter name) by target name.

        Raises:
            ValueError: a key names no target of this adapter.
        """
        if pattern is None:
            return None
        by_key = {self.pattern_key(t.name, True): t.name for t in self.targets}
        by_key.update({self.pattern_key(t.name, False): t.name for t in self.targets})
        unknown = sorted(key for key in pattern if key not in by_key)
        if unknown:
            raise ValueError(
                f"rank_pattern keys {unknown[:4]} name no target of AdaLoRA adapter {self.adapter_name!r}; expected "
                f"'<target>.lora_E' for targets {[t.name for t in self.targets][:4]}..."
            )
        return {by_key[key]: list(flags) for key, flags in pattern.items()}


def _total_step(config: AdaLoraConfig) -> int:
    assert config.total_step is not None  # AdaLoraConfig requires it
    return config.total_step
