"""The modules whose ``forward`` a prompt shadows (its *roots*), each with its role.

A decoder-only or encoder-only model gets the prompt however it is invoked: through the model
itself (role ``"model"``) or a module under it that embeds the same tokens (``"base"``:
``model.model``, ``model.bert``, ``model.transformer``, OPT's ``model.model.decoder``). An
encoder-decoder gets it in front of the encoder input (``"encoder"``), and its decoder stack
(``"decoder"``) extends the cross-attention mask over the virtual positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from prefix_hooks.core.transformers_compat import require_known_cache_parameter
from prefix_hooks.prompt.resolve import model_type

MODEL, BASE, ENCODER, DECODER = "model", "base", "encoder", "decoder"


@dataclass(frozen=True)
class Root:
    """A module whose ``forward`` is shadowed, with its ``forward`` parameter names and its role:
    ``"model"`` (the model itself: labels too), ``"base"`` (a module under it that embeds the same
    tokens), ``"encoder"`` (an encoder-decoder's encoder stack), ``"decoder"`` (its decoder stack)."""

    module: nn.Module
    params: list[str]
    role: str

    @classmethod
    def of(cls, module: nn.Module, role: str) -> Root:
        return cls(module, list(inspect.signature(module.forward).parameters), role)


def prompt_root(model: nn.Module) -> nn.Module:
    """The module whose token inputs get the prompt: the encoder of an encoder-decoder, else the model.

    Raises:
        ValueError: a multimodal model, or the module takes no ``input_ids`` / ``inputs_embeds``.
    """
    config = getattr(model, "config", None)
    name = model_type(model)
    if getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None:
        raise ValueError(
            f"model_type={name!r} is multimodal; prompt tuning supports text models only (its image or audio "
            "features sit among the token embeddings)"
        )
    root = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model  # type: ignore[operator]
    require_known_cache_parameter(root)
    params = inspect.signature(root.forward).parameters
    missing = [param for param in ("input_ids", "inputs_embeds") if param not in params]
    if missing:
        raise ValueError(
            f"model_type={name!r}: {type(root).__name__}.forward takes no {' / '.join(missing)}; prompt tuning "
            "puts the virtual tokens in front of token embeddings (models with vision or audio inputs are not "
            "supported)"
        )
    return root


def _base_stacks(model: nn.Module, embedding: nn.Module) -> list[nn.Module]:
    """The modules under ``model`` that own its token ``embedding`` and take the token inputs
    (``input_ids``, ``inputs_embeds``, ``attention_mask``): ``model.model``, ``model.bert``,
    ``model.transformer``, OPT's ``model.model.decoder``, outermost first."""
    found = []
    for module in model.modules():
        get_input_embeddings = getattr(module, "get_input_embeddings", None)
        if module is model or not callable(get_input_embeddings):
            continue
        try:
            owned = get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        params = inspect.signature(module.forward).parameters
        if owned is embedding and all(name in params for name in ("input_ids", "inputs_embeds", "attention_mask")):
            found.append(module)
    return found


def token_roots(model: nn.Module, root: nn.Module, embedding: nn.Module) -> list[Root]:
    """The roots that put the prompt in, outermost first: an encoder-decoder's encoder (``root``), or
    the model and its base stacks that own the token ``embedding``."""
    if root is not model:
        return [Root.of(root, ENCODER)]
    return [Root.of(model, MODEL), *(Root.of(base, BASE) for base in _base_stacks(model, embedding))]


def decoder_root(model: nn.Module, root: nn.Module) -> Root | None:
    """The decoder stack of an encoder-decoder (whose encoder is ``root``), ``None`` for other models."""
    return None if root is model else Root.of(model.get_decoder(), DECODER)  # type: ignore[operator]
