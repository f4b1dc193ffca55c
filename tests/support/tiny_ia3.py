"""Tiny models for the (IA)^3 tests: one builder per supported model type, delegating to the
family modules (``tiny_models``, ``tiny_inline``, ``tiny_encoders``, ``tiny_seq2seq``).

(IA)^3 adds no family of its own: ``FAMILIES`` / ``build`` / ``example_inputs`` are the union of
those modules, so a test can walk every type ``prefix_hooks.supported()`` lists. Also the
helpers the (IA)^3 tests share: random vectors and a hand-written fold of vectors into weights
(the oracle, independent of ``prefix_hooks.ia3``).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import tiny_encoders
import tiny_inline
import tiny_models
import tiny_seq2seq
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from prefix_hooks.ia3 import IA3Attachment

_SOURCES: dict[str, ModuleType] = {
    **{model_type: tiny_inline for model_type in tiny_inline.FAMILIES},
    **{model_type: tiny_encoders for model_type in tiny_encoders.FAMILIES},
    **{model_type: tiny_seq2seq for model_type in tiny_seq2seq.FAMILIES},
}

FAMILIES: dict[str, tuple[str, ...]] = {
    **{family: tiny_models.implementations(family) for family in tiny_models.FAMILIES},
    **{model_type: tuple(source.FAMILIES[model_type]) for model_type, source in _SOURCES.items()},
}


def build(model_type: str, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    """The tiny model of ``model_type`` from its family module, eval mode, float32."""
    if model_type in tiny_models.FAMILY_CONFIGS:
        return tiny_models.build_model(model_type, attn_implementation, seed)
    model: PreTrainedModel = _SOURCES[model_type].build(model_type, attn_implementation, seed)
    return model


def example_inputs(model_type: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch for one forward of ``build(model_type)`` (row 1 left-padded where the family pads)."""
    if model_type in tiny_models.FAMILY_CONFIGS:
        return tiny_models.random_batch(batch, 7, seed=seed, left_pad=[0, 2][:batch])
    inputs: dict[str, torch.Tensor] = _SOURCES[model_type].example_inputs(model_type, batch, seed)
    return inputs


def output_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits and the last (decoder) hidden state of one forward, flattened: fresh classification
    heads give logits ~1e-2, too small alone to show a wrong scaling at 1e-5."""
    output: Any = model(**inputs, output_hidden_states=True)
    parts = [output.logits.flatten()] if isinstance(getattr(output, "logits", None), torch.Tensor) else []
    hidden = getattr(output, "decoder_hidden_states", None) or getattr(output, "hidden_states", None)
    if hidden:
        parts.append(hidden[-1].flatten())
    return torch.cat(parts)


def randomise(handle: IA3Attachment, seed: int = 5, spread: float = 0.5) -> None:
    """Give every vector of ``handle`` values ``1 + spread * N(0, 1)`` (clearly not a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, vector in handle.named_parameters():
            if vector.dim() == 2 and 1 in vector.shape:
                noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
                vector.copy_(1 + spread * noise)


def fold_by_hand(model: nn.Module, vectors: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Multiply weights (and biases) of ``model`` in place: the (IA)^3 maths written out.

    ``vectors``: module name -> (vector, feed-forward). A regular vector (out, 1) scales output
    features (rows of a Linear weight (out, in), columns of a Conv1D weight (in, out), and the
    bias); a feed-forward vector (1, in) scales input features.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (vector, feedforward) in vectors.items():
            module = modules[name]
            weight = module.weight
            flat = vector.reshape(-1).to(weight.dtype)
            if isinstance(module, Conv1D):  # (in, out)
                weight.mul_(flat[:, None] if feedforward else flat[None, :])
            else:  # (out, in)
                weight.mul_(flat[None, :] if feedforward else flat[:, None])
            if not feedforward and module.bias is not None:
                module.bias.mul_(flat)


# --- the PEFT-parity cases (tests/ia3/test_ia3_peft_parity.py, tests/checkpoint/test_checkpoint_ia3.py) ---
Case = tuple[Callable[[], PreTrainedModel], dict[str, torch.Tensor], str]


def with_random_biases(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with N(0, 0.5) biases: transformers initialises them to zero, which would hide
    whether a merge scales the bias."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def case(family: str) -> Case:
    """(builder, left-padded batch, task type) for the three families PEFT defaults cover."""
    if family == "bert":
        batch = tiny_encoders.text_batch("bert", batch=3, seed=1, left_pad=[0, 2, 1])
        return lambda: with_random_biases(tiny_encoders.build("bert")), batch, "SEQ_CLS"
    return lambda: with_random_biases(tiny_models.build_model(family)), tiny_models.random_batch(3, 7, seed=1, left_pad=[0, 2, 4]), "CAUSAL_LM"


def signal(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits and the last hidden state, flattened: BERT's fresh classifier gives logits ~1e-2, too
    small alone to show a wrong scaling at 1e-5."""
    output = model(**batch, output_hidden_states=True)
    return torch.cat([output.logits.flatten(), output.hidden_states[-1].flatten()])
