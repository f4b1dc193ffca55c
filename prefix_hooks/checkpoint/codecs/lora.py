"""Checkpoint codec of LoRA: PEFT 0.21's ``adapter_model.safetensors`` layout.

Keys (the adapter name removed, as PEFT's ``get_peft_model_state_dict`` does)::

    base_model.model.<target>.lora_A.weight      (r, in)       Linear / Conv1D (Conv2d: (r, in, k, k))
    base_model.model.<target>.lora_B.weight      (out, r)      Linear / Conv1D (Conv2d: (out, r, 1, 1))
    base_model.model.<target>.lora_embedding_A   (r, V)        Embedding
    base_model.model.<target>.lora_embedding_B   (D, r)        Embedding
    base_model.model.<target>.lora_magnitude_vector  (out,)    DoRA (Embedding (D,), Conv2d (1, out, 1, 1)); in
                                                               the model ``<target>.lora_magnitude_vector.<adapter>.weight``
    base_model.model.<module>.<key>              every ``state_dict()`` entry of a modules-to-save copy

The config and these tensors rebuild the adapter exactly, so LoRA writes nothing into the
extra file. Since the keys carry no adapter name, a checkpoint loads under any name.

PEFT also writes two kinds of *base-model* tensors, which this codec accepts on load only when
they equal the model's own (loading never changes the base model; see :func:`LoraCodec.load`):

* ``bias="all"`` / ``"lora_only"``: the trained biases of the base model;
* a targeted embedding (``save_embedding_layers="auto"``): ``<target>.base_layer.weight``, the
  embedding matrix itself.

Because the biases a ``bias != "none"`` adapter trains are the model's own tensors, this codec
saves them in PEFT's keys (so PEFT loads them), and loading them back succeeds when they are the
model's current values (e.g. the same process, or a model the trained biases were copied into).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prefix_hooks.checkpoint.codec import SavedAdapter, register_codec
from prefix_hooks.checkpoint.codecs._weight_adapters import Selection, check_loadable, peft_config
from prefix_hooks.checkpoint.state_dicts import check_state_dict, copy_into, cpu_copies, loading_config
from prefix_hooks.core import swaps
from prefix_hooks.core.legacy_names import current_keys
from prefix_hooks.lora.attachment import LoraAttachment
from prefix_hooks.lora.config import LoraConfig
from prefix_hooks.lora.targets import select_targets

PEFT_PREFIX = "base_model.model."
"""Prefix of every key PEFT saves for a non-prompt-learning adapter."""

MAGNITUDE = "lora_magnitude_vector"
"""The container of the DoRA magnitudes in a LoRA layer."""

_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<container>lora_[A-Za-z_]+)\.(?P<adapter>[^.]+)(?P<rest>(\.[^.]+)*)$")


def factor_key(name: str, adapter_name: str) -> str:
    """PEFT's checkpoint key of one LoRA factor, from its in-model name.

    ``<target>.lora_A.<adapter>.weight`` -> ``base_model.model.<target>.lora_A.weight``;
    ``<target>.lora_embedding_A.<adapter>`` -> ``base_model.model.<target>.lora_embedding_A``;
    ``<target>.lora_magnitude_vector.<adapter>.weight`` -> ``base_model.model.<target>.lora_magnitude_vector``
    (PEFT drops that ``.weight``: the magnitude was a plain parameter before PEFT made it a module).

    Raises:
        ValueError: ``name`` is not ``<module>.lora_<kind>.<adapter_name>[.<param>]``.
    """
    found = _FACTOR.match(name)
    if found is None or found["adapter"] != adapter_name:
        raise ValueError(f"{name!r} is not the name of a LoRA factor of adapter {adapter_name!r}")
    rest = "" if found["container"] == MAGNITUDE and found["rest"] == ".weight" else found["rest"]
    return f"{PEFT_PREFIX}{found['module']}.{found['container']}{rest}"


def modules_to_save_copies(handle: LoraAttachment) -> dict[str, nn.Module]:
    """Qualified module name -> this adapter's trainable copy of it (``modules_to_save``).

    ``LoraAttachment.adapter_modules()`` lists the factor containers first and the copies last,
    in ``modules_to_save_names`` order; the copies' parameters are checked against
    ``named_parameters()`` so a change of that order fails here rather than saving wrong tensors.
    """
    names = handle.modules_to_save_names
    modules = handle.adapter_modules()
    copies = dict(zip(names, modules[len(modules) - len(names) :])) if names else {}
    named = dict(handle.named_parameters())
    for name, duplicate in copies.items():
        for key, parameter in duplicate.named_parameters():
            if named.get(f"{name}.modules_to_save.{handle.adapter_name}.{key}") is not parameter:
                raise RuntimeError(
                    f"cannot find the modules-to-save copy of {name!r} in LoraAttachment.adapter_modules()"
                )
    return copies


def adapter_state_dict(handle: LoraAttachment) -> dict[str, torch.Tensor]:
    """The adapter's own tensors under PEFT's checkpoint keys (live tensors, detached, not copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, parameter in handle.named_parameters():
        if ".modules_to_save." not in name:
            out[factor_key(name, handle.adapter_name)] = parameter.detach()
    for name, duplicate in modules_to_save_copies(handle).items():
        for key, tensor in duplicate.state_dict(keep_vars=True).items():
            out[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach()
    return out


def copy_bias_aliases(handle: LoraAttachment) -> dict[str, torch.Tensor]:
    """With ``bias="all"``, PEFT saves each bias of a modules-to-save copy a second time (the same
    tensor :func:`adapter_state_dict` holds under ``<module>.<key>``), under its in-model key with
    the adapter name removed only where it is second to last, as PEFT's rule does:
    ``<module>.modules_to_save.bias``, but ``<module>.modules_to_save.<adapter>.dense.bias``."""
    if handle.config.bias != "all":
        return {}
    out = {}
    for name, duplicate in modules_to_save_copies(handle).items():
        for key, tensor in duplicate.state_dict(keep_vars=True).items():
            if key == "bias":
                out[f"{PEFT_PREFIX}{name}.modules_to_save.bias"] = tensor.detach()
            elif key.endswith(".bias"):
                out[f"{PEFT_PREFIX}{name}.modules_to_save.{handle.adapter_name}.{key}"] = tensor.detach()
    return out


def base_state_dict(handle: LoraAttachment) -> dict[str, torch.Tensor]:
    """The base-model biases a ``bias="all"`` / ``"lora_only"`` adapter trains, under PEFT's keys.

    PEFT names them as in its wrapped model: a target's bias is ``<target>.base_layer.bias``; with
    ``"all"`` a module to save contributes ``<module>.original_module.bias`` (its copy's bias is in
    :func:`adapter_state_dict` and :func:`copy_bias_aliases`).
    """
    if handle.config.bias == "none":
        return {}
    targets = dict.fromkeys(handle.target_names)
    saved = dict.fromkeys(handle.modules_to_save_names)
    model = handle.model
    out: dict[str, torch.Tensor] = {}
    for module_name, module in swaps.clean_view(model).named_modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.Tensor):
            continue
        if module_name in targets:
            out[f"{PEFT_PREFIX}{module_name}.base_layer.bias"] = bias.detach()
        elif handle.config.bias == "all":
            owner = next((name for name in saved if module_name == name or module_name.startswith(name + ".")), None)
            if owner is None:
                out[f"{PEFT_PREFIX}{module_name}.bias"] = bias.detach()
            else:
                inner = module_name[len(owner) :]
                out[f"{PEFT_PREFIX}{owner}.original_module{inner}.bias"] = bias.detach()
    return out


class LoraCodec:
    """Saves a :class:`LoraAttachment` in PEFT's layout and builds one back from it."""

    config_types: tuple[type, ...] = (LoraConfig,)
    peft_types: tuple[str, ...] = ("LORA",)

    def save(self, handle: Any) -> SavedAdapter:
        """The adapter's config (as :func:`peft_config` writes it) and tensors (CPU copies: later
        training does not change them).

        Raises:
            TypeError: ``handle`` is not a :class:`LoraAttachment`.
        """
        if not isinstance(handle, LoraAttachment):
            raise TypeError(f"the LoRA codec saves a LoraAttachment, got {type(handle).__name__}")
        tensors = {**base_state_dict(handle), **adapter_state_dict(handle), **copy_bias_aliases(handle)}
        view = swaps.clean_view(handle.model)
        modules = dict(view.named_modules())

        def select(legacy_names: bool) -> Selection:
            return {"target_modules": select_targets(view, handle.config, legacy_names=legacy_names)}

        targets = [modules[name] for name in handle.target_names]
        config = peft_config(handle.config, targets, {"target_modules": list(handle.target_names)}, select)
        return SavedAdapter(config=config, tensors=cpu_copies(tensors))

    def load(
        self, model: nn.Module, config: Any, saved: SavedAdapter, adapter_name: str, trainable: bool
    ) -> LoraAttachment:
        """A LoRA adapter for ``model`` holding the saved values; validated, not attached.

        The targets are selected from ``config`` on ``model``, every saved key and shape is
        checked against them, and only then are the values copied into the new adapter's
        tensors. The adapter is built with ``inference_mode=not trainable`` (PEFT's
        ``is_trainable``), so its factors and copies have ``requires_grad=trainable``. Base-model
        tensors PEFT saves (trained biases, a targeted embedding's matrix) must equal the
        model's own: loading never changes the base model.

        Raises:
            TypeError: ``config`` is not a :class:`LoraConfig`.
            ValueError: no target matches, a key is missing or unexpected, a shape or dtype is
                wrong, a base tensor differs from the model's, or extra tensors are present;
                ``model`` is untouched.
        """
        check_loadable(config, LoraConfig, saved, "LoRA")
        config = loading_config(config, trainable)
        handle = LoraAttachment(model, config, adapter_name)
        load_tensors(handle, saved, f"LoRA adapter {adapter_name!r}")
        return handle


def load_tensors(handle: LoraAttachment, saved: SavedAdapter, what: str) -> None:
    """Check every saved key and shape against ``handle`` (a LoRA or AdaLoRA adapter, not attached),
    then copy the values into its tensors.

    Base-model tensors PEFT saves (trained biases, a targeted embedding's matrix) must equal the
    model's own: loading never changes the base model.

    Raises:
        ValueError: a key is missing or unexpected, a shape or dtype is wrong, a base tensor differs
            from the model's; nothing is copied then.
    """
    own = adapter_state_dict(handle)
    aliases = copy_bias_aliases(handle)
    # keys written for module names from before transformers 5 (PEFT adapters trained on 4.x)
    bases = base_state_dict(handle)
    given = current_keys(handle.model, saved.tensors, {*own, *aliases, *bases})
    base = {**bases, **_embedding_bases(handle, given)}
    check_state_dict(given, {**base, **own, **aliases}, what)
    _require_equal(
        given,
        base,
        f"is a base-model tensor (PEFT saves it for bias={handle.config.bias!r} or a targeted embedding) and "
        "differs from this model's; loading would have to change the base model, which attach never does. Load "
        "the adapter on the model it was trained with (its trained biases included)",
    )
    copy_into(given, own)
    _require_equal(given, aliases, "repeats a modules-to-save copy's bias but holds another value")


def _require_equal(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], why: str) -> None:
    """Raise ``ValueError`` naming the first key whose ``given`` value differs from ``expected``'s."""
    for key, tensor in expected.items():
        if not torch.equal(given[key].to(tensor.device, tensor.dtype), tensor):
            raise ValueError(f"checkpoint tensor {key!r} {why}")


def _embedding_bases(handle: LoraAttachment, given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<target>.base_layer.weight`` of each targeted ``nn.Embedding`` whose key ``given`` holds.

    PEFT's ``save_embedding_layers="auto"`` writes the whole embedding matrix of a targeted
    embedding; it is optional (PEFT loads without it), so it is expected only when present.
    """
    modules = dict(swaps.clean_view(handle.model).named_modules())
    out = {}
    for name in handle.target_names:
        module = modules[name]
        key = f"{PEFT_PREFIX}{name}.base_layer.weight"
        if isinstance(module, nn.Embedding) and key in given:
            out[key] = module.weight.detach()
    return out


CODEC = LoraCodec()
register_codec(CODEC)
