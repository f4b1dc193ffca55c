"""The adapter methods compared: ours and PEFT's counterpart with identical adapter weights.

A :class:`Method` says (a) how to build our handle on a model and (b) how to build the
PEFT model that computes the same function. Adding a method is one :func:`register`
call, e.g. for LoRA once ``prefix_hooks`` has it::

    register(Method(
        name="lora r=8",
        ours=lambda model: attach_lora(model, LoraConfig(r=8)),
        peft_config=lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=8),
        match_peft=copy_lora_weights,               # and merge_adapter() for "merged"
        unwrap_peft=lambda peft_model: peft_model.unload(),
    ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

from prefix_hooks import (
    AdaLoraAttachment,
    AdaLoraConfig,
    Attachment,
    IA3Attachment,
    IA3Config,
    LoraAttachment,
    LoraConfig,
    PrefixAttachment,
    PrefixTuningConfig,
    PromptAttachment,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_adalora,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)
from prefix_hooks.core.attachment import UndoStack

NUM_VIRTUAL_TOKENS = 20


def unwrap_prompt_learning(peft_model: peft.PeftModel) -> nn.Module:
    """PEFT's way back to the base model for prompt-learning methods (they have no ``unload()``).

    ``get_peft_model`` only wraps the model and clears ``requires_grad`` for these methods;
    the caller restores the flags.
    """
    return peft_model.get_base_model()


@dataclass(frozen=True)
class Method:
    """One adapter method, ours and PEFT's.

    Attributes:
        name: the label in the results table.
        ours: builds our (not yet attached) handle on a model.
        peft_config: a fresh PEFT config for the same adapter.
        match_peft: makes a PEFT model compute what our handle computes (copies weights).
        unwrap_peft: undoes ``get_peft_model`` and returns the base model.
        trains: whether the training-step scenarios apply (not to merged adapters).
    """

    name: str
    ours: Callable[[nn.Module], Attachment]
    peft_config: Callable[[], peft.PeftConfig]
    match_peft: Callable[[Attachment, peft.PeftModel], None]
    unwrap_peft: Callable[[peft.PeftModel], nn.Module] = unwrap_prompt_learning
    trains: bool = True

    def build_peft(self, model: nn.Module, handle: Attachment) -> peft.PeftModel:
        """Wrap ``model`` (an instance of its own, it is mutated) with PEFT, weights equal to ``handle``'s."""
        peft_model = peft.get_peft_model(model, self.peft_config())
        self.match_peft(handle, peft_model)
        return peft_model


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS`.

    Raises:
        ValueError: a method of that name is already registered.
    """
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered; registered: {', '.join(METHODS)}")
    METHODS[method.name] = method
    return method


def copy_prompt_encoder(handle: Attachment, peft_model: peft.PeftModel) -> None:
    """Load our encoder's weights into PEFT's ``prompt_encoder`` (same layout, see ``PrefixEncoder``)."""
    if not isinstance(handle, PrefixAttachment):
        raise TypeError(f"expected a PrefixAttachment, got {type(handle).__name__}")
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())


def prefix_tuning(name: str, prefix_projection: bool) -> Method:
    """Prefix tuning with ``NUM_VIRTUAL_TOKENS`` virtual tokens, ours and PEFT's."""
    return Method(
        name=name,
        ours=lambda model: attach_prefix(
            model, PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=prefix_projection)
        ),
        peft_config=lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=prefix_projection
        ),
        match_peft=copy_prompt_encoder,
    )


register(prefix_tuning(f"prefix P={NUM_VIRTUAL_TOKENS}", prefix_projection=False))
register(prefix_tuning(f"prefix P={NUM_VIRTUAL_TOKENS} + projection", prefix_projection=True))


# --- LoRA -----------------------------------------------------------------------------
LORA_RANK = 8
LORA_SEED = 7


class MergedLora(Attachment):
    """A LoRA handle that is merged into the base weights on every attach (unmerged on detach)."""

    def __init__(self, lora: LoraAttachment) -> None:
        super().__init__(lora.model, lora.adapter_name)
        self.lora = lora

    def _check_can_attach(self) -> None:
        if self.lora.is_attached:
            raise RuntimeError("the LoRA handle is already attached on its own")

    def _install(self, undo: UndoStack) -> None:
        self.lora.attach()
        undo.push(self.lora.detach)
        self.lora.merge()
        undo.push(self.lora.unmerge)

    def adapter_modules(self) -> list[nn.Module]:
        return self.lora.adapter_modules()


def _lora(model: nn.Module, use_dora: bool = False) -> LoraAttachment:
    """LoRA r=8 (DoRA with ``use_dora``) on the family's default targets, B drawn non-zero so that
    the adapter changes the logits."""
    handle = attach_lora(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, use_dora=use_dora))
    generator = torch.Generator().manual_seed(LORA_SEED)
    with torch.no_grad():
        for name, parameter in sorted(handle.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return handle


def copy_lora_weights(handle: Attachment, peft_model: peft.PeftModel) -> None:
    """Load our LoRA factors into PEFT's model: the attached state-dict keys are PEFT's minus its prefix."""
    lora = handle.lora if isinstance(handle, MergedLora) else handle
    if not isinstance(lora, LoraAttachment):
        raise TypeError(f"expected a LoraAttachment, got {type(handle).__name__}")
    with lora:
        ours = {f"base_model.model.{key}": value.clone() for key, value in lora.model.state_dict().items() if "lora_" in key}
    missing, _ = peft_model.load_state_dict(ours, strict=False)
    not_loaded = [key for key in missing if "lora_" in key]
    if not_loaded:
        raise KeyError(f"PEFT's LoRA factors not found among ours: {not_loaded[:3]}")


def _lora_peft_config(use_dora: bool = False) -> peft.PeftConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=2 * LORA_RANK, use_dora=use_dora)


def _merged_peft(handle: Attachment, peft_model: peft.PeftModel) -> None:
    copy_lora_weights(handle, peft_model)
    peft_model.merge_adapter()


def lora_methods(label: str, use_dora: bool) -> list[Method]:
    """LoRA (or DoRA) r=8, unmerged and merged, ours and PEFT's."""
    return [
        Method(
            name=f"{label} r={LORA_RANK}",
            ours=lambda model: _lora(model, use_dora),
            peft_config=lambda: _lora_peft_config(use_dora),
            match_peft=copy_lora_weights,
            unwrap_peft=lambda peft_model: peft_model.unload(),
        ),
        Method(
            name=f"{label} r={LORA_RANK} merged",
            ours=lambda model: MergedLora(_lora(model, use_dora)),
            peft_config=lambda: _lora_peft_config(use_dora),
            match_peft=_merged_peft,
            unwrap_peft=lambda peft_model: peft_model.unload(),
            trains=False,
        ),
    ]


for _method in (*lora_methods("lora", use_dora=False), *lora_methods("dora", use_dora=True)):
    register(_method)


# --- AdaLoRA -----------------------------------------------------------------------------------
ADALORA_INIT_R, ADALORA_TARGET_R, ADALORA_TOTAL_STEP = 12, 8, 1000


def _adalora(model: nn.Module) -> AdaLoraAttachment:
    """AdaLoRA init_r=12 on the family's default targets, ``lora_E`` drawn non-zero so that the adapter changes the logits."""
    config = AdaLoraConfig(init_r=ADALORA_INIT_R, target_r=ADALORA_TARGET_R, total_step=ADALORA_TOTAL_STEP)
    handle = attach_adalora(model, config)
    generator = torch.Generator().manual_seed(LORA_SEED)
    with torch.no_grad():
        for name, parameter in sorted(handle.named_parameters()):
            if ".lora_E." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return handle


register(
    Method(
        name=f"adalora r={ADALORA_INIT_R}->{ADALORA_TARGET_R}",
        ours=_adalora,
        peft_config=lambda: peft.AdaLoraConfig(
            task_type="CAUSAL_LM", init_r=ADALORA_INIT_R, target_r=ADALORA_TARGET_R, total_step=ADALORA_TOTAL_STEP
        ),
        match_peft=copy_lora_weights,  # the attached state-dict keys are PEFT's minus its prefix, as LoRA's
        unwrap_peft=lambda peft_model: peft_model.unload(),
    )
)


# --- prompt tuning and P-tuning -------------------------------------------------------------
def copy_prompt_module(handle: Attachment, peft_model: peft.PeftModel) -> None:
    """Load our prompt module into PEFT's ``prompt_encoder`` (the same attribute names)."""
    if not isinstance(handle, PromptAttachment):
        raise TypeError(f"expected a PromptAttachment, got {type(handle).__name__}")
    peft_model.prompt_encoder["default"].load_state_dict(handle.prompt_encoder.state_dict())


register(
    Method(
        name=f"prompt tuning P={NUM_VIRTUAL_TOKENS}",
        ours=lambda model: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)),
        peft_config=lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS),
        match_peft=copy_prompt_module,
    )
)
register(
    Method(
        name=f"p-tuning P={NUM_VIRTUAL_TOKENS} mlp",
        ours=lambda model: attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)),
        peft_config=lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS),
        match_peft=copy_prompt_module,
    )
)


# --- IA3 ------------------------------------------------------------------------------
IA3_SEED = 11


def _ia3(model: nn.Module) -> IA3Attachment:
    """IA3 on the family's default targets, vectors drawn around 1 so that the adapter changes the logits."""
    handle = attach_ia3(model, IA3Config())
    generator = torch.Generator().manual_seed(IA3_SEED)
    with torch.no_grad():
        for _name, parameter in sorted(handle.named_parameters()):
            parameter.copy_(1 + 0.1 * torch.randn(parameter.shape, generator=generator))
    return handle


def copy_ia3_vectors(handle: Attachment, peft_model: peft.PeftModel) -> None:
    """Load our IA3 vectors into PEFT's model by PEFT's checkpoint keys."""
    if not isinstance(handle, IA3Attachment):
        raise TypeError(f"expected an IA3Attachment, got {type(handle).__name__}")
    result: Any = peft.set_peft_model_state_dict(peft_model, handle.peft_state_dict())  # (missing, unexpected)
    not_loaded = [key for key in result.missing_keys if "ia3_" in key]
    if not_loaded:
        raise KeyError(f"PEFT's IA3 vectors not found among ours: {not_loaded[:3]}")


register(
    Method(
        name="ia3",
        ours=_ia3,
        peft_config=lambda: peft.IA3Config(task_type="CAUSAL_LM"),
        match_peft=copy_ia3_vectors,
        unwrap_peft=lambda peft_model: peft_model.unload(),
    )
)
