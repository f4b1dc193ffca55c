"""Prefix tuning attached through hooks: ``attach_prefix``.

On attach, in this order (each step undone on detach, in reverse):

1. every base parameter is frozen (flags recorded);
2. the :class:`PrefixEncoder` is registered under the model (``model.parameters()``
   yields it, so an optimizer built by Trainer trains it);
3. the attention interposer is installed (shared by all attached models);
4. a forward pre-hook on the base model computes the prefix once per forward, hands
   it to the attention layers through ``**kwargs`` and offsets ``position_ids``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prefix_hooks import attention_interposer
from prefix_hooks.attachment import Attachment, UndoStack, attachments_of, freeze_parameters, register_child
from prefix_hooks.config import PrefixTuningConfig, resolve_prefix_config
from prefix_hooks.families import ArchitectureAdapter, ModelDims, PositionInputs, adapter_for
from prefix_hooks.prefix_encoder import PrefixEncoder
from prefix_hooks.splice import SUPPORTED_IMPLEMENTATIONS, Backend, backend_of


@dataclass
class PrefixForwardState:
    """The prefix of one forward call, for every attention module of the model.

    Attributes:
        layer_of: attention module -> layer index.
        kv: ``(L, 2, kv_heads, P, D)``; ``kv[i, 0]`` are layer ``i``'s keys, ``kv[i, 1]`` its values.
        mask_cache: extended masks, shared by the layers that receive the same mask.
    """

    layer_of: dict[nn.Module, int]
    kv: torch.Tensor
    rebuild: Callable[[], torch.Tensor]
    mask_cache: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    spliced: int = 0
    _no_grad_calls: bool = False

    def prefix_for(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        layer = self.layer_of.get(module)
        if layer is None:
            return None
        self.spliced += 1
        kv = self.kv
        if kv.requires_grad and not torch.is_grad_enabled():
            self._no_grad_calls = True  # reentrant checkpointing's first pass records no graph here
        elif self._no_grad_calls and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            # Reentrant recomputation runs one backward per layer: give each layer its own
            # encoder graph, or the second layer would backpropagate through freed buffers.
            kv = self.rebuild()
        return kv[layer, 0], kv[layer, 1]  # (kv_heads, P, D) each


def _model_dims(family: ArchitectureAdapter, model: nn.Module) -> tuple[ModelDims, dict[nn.Module, int]]:
    sites = family.attention_sites(model)
    if not sites:
        raise ValueError(f"found no attention modules {family.attention_classes} in {type(model).__name__}")
    shapes = {(site.kv_heads, site.head_dim) for site in sites}
    if len(shapes) != 1:
        raise ValueError(
            f"{family.name}: attention layers produce different key shapes {sorted(shapes)} (kv_heads, head_dim); "
            "a single prefix width cannot serve them"
        )
    ((kv_heads, head_dim),) = shapes
    dims = ModelDims(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        num_layers=len(sites),
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_transformer_submodules=family.num_transformer_submodules,
    )
    return dims, {site.module: site.layer for site in sites}


def _first_parameter_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


class PrefixAttachment(Attachment):
    """A prefix-tuning adapter for one model; see :func:`attach_prefix`.

    Attributes:
        config: the resolved config (every dimension filled from the model).
        encoder: the :class:`PrefixEncoder`, float32, on the model's device.
    """

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        if not isinstance(config, PrefixTuningConfig):
            kind = f"{type(config).__module__}.{type(config).__qualname__}"
            raise TypeError(
                f"config must be a prefix_hooks.PrefixTuningConfig, got {kind}; a PEFT config converts with "
                "prefix_hooks.PrefixTuningConfig(**{k: v for k, v in peft_config.to_dict().items() "
                "if k in prefix_hooks.PrefixTuningConfig.__dataclass_fields__})"
            )
        self.family = adapter_for(model)
        reason = self.family.unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self._check_implementation()
        dims, self._layer_of = _model_dims(self.family, model)
        self.config = resolve_prefix_config(config, dims)
        self._base = self.family.base_model(model)
        self._forward_params = list(inspect.signature(self._base.forward).parameters)
        self._offset = self.config.effective_position_offset
        if self._offset and "position_ids" not in self._forward_params:
            raise ValueError(
                f"position_offset={self._offset} needs position_ids, which {type(self._base).__name__}.forward "
                "does not take; set position_offset=0"
            )
        self.encoder = PrefixEncoder(self.config).to(_first_parameter_device(model))
        self.encoder.requires_grad_(not self.config.inference_mode)
        self._child_name = f"prefix_hooks_{adapter_name}"
        self._dims = dims

    def adapter_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def _check_implementation(self) -> None:
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if backend_of(implementation) is Backend.UNSUPPORTED:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported with a prefix; "
                f"use one of {', '.join(SUPPORTED_IMPLEMENTATIONS)}"
            )

    def _check_can_attach(self) -> None:
        for other in attachments_of(self.model):
            if isinstance(other, PrefixAttachment):
                raise RuntimeError(
                    f"the model already carries the prefix {other.adapter_name!r}; prefixes do not stack. "
                    "Detach it first, or use one PrefixTuningConfig with more num_virtual_tokens"
                )
        if hasattr(self.model, self._child_name):
            raise ValueError(f"{type(self.model).__name__} already has an attribute {self._child_name!r}")
        self._check_implementation()

    def _install(self, undo: UndoStack) -> None:
        freeze_parameters(self.model, undo)
        register_child(self.model, self._child_name, self.encoder, undo)
        attention_interposer.acquire()
        undo.push(attention_interposer.release)
        pre_hook = self._base.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        undo.push(pre_hook.remove)
        post_hook = self._base.register_forward_hook(self._check_spliced, with_kwargs=True)
        undo.push(post_hook.remove)

    # --- per forward --------------------------------------------------------------
    def layer_prefixes(self) -> torch.Tensor:
        """Every layer's prefix, computed once: ``(L, 2, kv_heads, P, D)`` (a view of the encoder output)."""
        dims = self._dims
        flat = self.encoder.prefix()  # (P, L*2*kv_heads*D)
        per_layer = flat.view(self.config.num_virtual_tokens, dims.num_layers, 2, dims.kv_heads, dims.head_dim)
        return per_layer.permute(1, 2, 3, 0, 4)  # (L, 2, kv_heads, P, D)

    def _argument(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        if name in self._forward_params:
            index = self._forward_params.index(name)
            if index < len(args):
                return args[index]
        return None

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.is_enabled:
            return None
        self._check_implementation()
        kwargs = dict(kwargs)
        kwargs[attention_interposer.STATE_KWARG] = PrefixForwardState(
            self._layer_of, self.layer_prefixes(), self.layer_prefixes
        )
        if self._offset:
            args, kwargs = self._offset_positions(args, kwargs)
        return args, kwargs

    def _check_spliced(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        state = kwargs.get(attention_interposer.STATE_KWARG)
        if isinstance(state, PrefixForwardState) and state.spliced == 0 and self._layer_of:
            raise RuntimeError(
                f"the prefix reached none of the {len(self._layer_of)} attention layers during "
                f"{type(module).__name__}.forward; the {self.family.name!r} family adapter does not match "
                "this model (its base_model must pass **kwargs down to the attention function)"
            )

    def _offset_positions(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        positions = self._argument("position_ids", args, kwargs)
        if positions is not None:
            positions = positions + self._offset
        else:
            tokens = self._argument("input_ids", args, kwargs)
            if tokens is None:
                tokens = self._argument("inputs_embeds", args, kwargs)
            if tokens is None:
                return args, kwargs
            cache = self._argument("past_key_values", args, kwargs)
            past_len = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = self._argument("attention_mask", args, kwargs)
            inputs = PositionInputs(
                seq_len=tokens.shape[1],
                past_len=int(past_len),
                attention_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                device=tokens.device,
            )
            positions = self.family.position_ids(inputs, self._offset)
        index = self._forward_params.index("position_ids")
        if index < len(args):
            args = (*args[:index], positions, *args[index + 1 :])
        else:
            kwargs["position_ids"] = positions
        return args, kwargs


def attach_prefix(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> PrefixAttachment:
    """Build a prefix-tuning adapter for ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Everything is validated and the encoder is built here; nothing about ``model`` is
    changed until the adapter is attached.

    Args:
        model: a transformers model of a supported family (see
            :func:`prefix_hooks.families.supported`).
        config: the prefix config; dimensions left ``None`` are read from the model.
        adapter_name: a Python identifier naming the adapter.

    Returns:
        The (not yet attached) :class:`PrefixAttachment`.

    Raises:
        ValueError: the config disagrees with the model, or the model is not supported.

    Example:
        >>> with attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=20)) as handle:
        ...     trainer.train()
    """
    return PrefixAttachment(model, config, adapter_name)
