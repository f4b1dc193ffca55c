"""The device a module computes on, for adapter parameters built next to it.

accelerate's big-model dispatch (``dispatch_model`` / ``cpu_offload`` / a ``device_map`` with
``"cpu"`` or ``"disk"`` entries) leaves offloaded weights on the ``meta`` device and loads them
onto its hook's ``execution_device`` for each forward. Adapter parameters must live on that
device, never on ``meta`` (a meta parameter silently computes nothing).
"""

from __future__ import annotations

import torch
from torch import nn


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of accelerate's hook on ``module`` (``_hf_hook``, possibly a
    ``SequentialHook``), or ``None`` when it has none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    for part in getattr(hook, "hooks", None) or [hook]:
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)  # accelerate may store an int (a CUDA index) or a str
    return None


def offload_aware_device(module: nn.Module, tensor: torch.Tensor) -> torch.device:
    """``tensor.device``, except for a tensor of ``module`` that accelerate offloaded (on ``meta``
    with a hook on ``module``): the hook's execution device. A meta tensor without a hook (a model
    built on meta, to be materialised later) stays on meta."""
    if tensor.device.type == "meta":
        return hook_execution_device(module) or tensor.device
    return tensor.device


def compute_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its
    first parameter or buffer not on ``meta``, else the first execution device of a hooked
    submodule (everything offloaded), else the CPU."""
    device = hook_execution_device(module)
    if device is not None:
        return device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    for submodule in module.modules():
        device = hook_execution_device(submodule)
        if device is not None:
            return device
    return torch.device("cpu")
