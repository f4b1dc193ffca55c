"""(IA)^3 attached in place: ``attach_ia3``.

On attach, in this order (each step undone on detach, in reverse):

1. every base parameter is frozen (parameters of adapters attached before stay trainable);
2. the vectors are registered under the model as ``ia3_hooks_<adapter>`` so
   ``model.parameters()`` (and an optimizer Trainer builds) sees them;
3. every target module gets this adapter's vector in its shared scaling hooks
   (:mod:`prefix_hooks.ia3.scaling`): no module is replaced;
4. every module to save is replaced by a :class:`~prefix_hooks.core.modules_to_save.ModulesToSaveWrapper`
   running this adapter's trainable copy (:mod:`prefix_hooks.core.saved_modules`).

The vectors and copies are built once, in the constructor, and kept by the handle:
detaching and attaching again resumes with the trained values.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from prefix_hooks.core import swaps
from prefix_hooks.core.attachment import Attachment, UndoStack, freeze_parameters, register_child
from prefix_hooks.core.checkpoints import built_or_loaded
from prefix_hooks.core.config_fields import require_config
from prefix_hooks.core.devices import offload_aware_device
from prefix_hooks.core.disabled_blocks import DisabledBlocks
from prefix_hooks.core.merged_weights import check_no_other_merge
from prefix_hooks.core.saved_modules import SavedModules
from prefix_hooks.ia3 import scaling
from prefix_hooks.ia3.config import IA3Config
from prefix_hooks.ia3.targets import Target, select_targets, task_modules_to_save

PEFT_PREFIX = "base_model.model."
"""Prefix of every key PEFT saves for a non-prompt-learning adapter."""


class IA3Vectors(nn.Module):
    """The container registered under the model while attached; ``vectors[i]`` belongs to target ``i``.

    Attributes:
        vectors: one ``nn.Parameter`` per target: ``(out_features, 1)`` for a regular target,
            ``(1, in_features)`` for a feed-forward one (PEFT's ``ia3_l`` shapes).
    """

    def __init__(self, vectors: list[nn.Parameter]) -> None:
        super().__init__()
        self.vectors = nn.ParameterList(vectors)


def _vector_for(target: Target, init_ones: bool, trainable: bool) -> nn.Parameter:
    """A new vector for ``target``: ``(1, in)`` feed-forward, ``(out, 1)`` otherwise; ones or N(0, 1);
    float32 on the weight's device (float64 for a float64 weight), as PEFT's autocast leaves it."""
    weight = target.module.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(target.module, nn.Linear):
        in_features, out_features = target.module.in_features, target.module.out_features
    else:  # Conv1D: weight (in, out)
        in_features, out_features = weight.shape
    shape = (1, in_features) if target.feedforward else (out_features, 1)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # PEFT upcasts fp16/bf16
    # a weight offloaded by accelerate sits on meta: the vector goes where the module computes
    device = offload_aware_device(target.module, weight)
    if init_ones:
        values = torch.ones(shape, dtype=dtype, device=device)
    else:
        values = torch.randn(shape).to(device, dtype)
    return nn.Parameter(values, requires_grad=trainable)


class IA3Attachment(Attachment):
    """An (IA)^3 adapter for one model; see :func:`attach_ia3`.

    A regular target's output becomes ``base(x) * l`` (bias included), a feed-forward
    target computes ``base(x * l)``; several (IA)^3 adapters on one module multiply.

    Attributes:
        config: the :class:`IA3Config`.
        targets: the scaled modules, in ``named_modules()`` order.
        modules_to_save_names: qualified names of the modules trained as full copies.
        saved_modules: those copies (see :mod:`prefix_hooks.core.saved_modules`).
    """

    def __init__(self, model: nn.Module, config: IA3Config, adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        self.config = require_config(config, IA3Config)
        with swaps.lock:
            view = swaps.clean_view(model)  # the model without adapters: original names and modules
            self.targets = select_targets(view, config)
        trainable = not config.inference_mode
        self.saved_modules = SavedModules(
            model, config.modules_to_save or [], task_modules_to_save(config), adapter_name, trainable
        )
        self._vectors = IA3Vectors([_vector_for(t, config.init_ia3_weights, trainable) for t in self.targets])
        self.modules_to_save_names = self.saved_modules.names
        self._merged = False
        self._disabled_blocks = DisabledBlocks(f"(IA)^3 adapter {adapter_name!r}")  # guarded by scaling.lock

    @property
    def child_name(self) -> str:
        """The attribute of the model holding the vectors while attached."""
        return f"ia3_hooks_{self.adapter_name}"

    # --- parameters -------------------------------------------------------------------
    def adapter_modules(self) -> list[nn.Module]:
        return [self._vectors, *self.saved_modules.copies()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """PEFT's in-model names (without ``base_model.model.``): ``<target>.ia3_l.<adapter>``,
        ``<module>.modules_to_save.<adapter>.<param>``."""
        for target, vector in zip(self.targets, self._vectors.vectors):
            yield f"{target.name}.ia3_l.{self.adapter_name}", vector
        yield from self.saved_modules.named_parameters()

    def vector(self, name: str) -> nn.Parameter:
        """The vector of the target named ``name`` (a qualified module name).

        Raises:
            KeyError: ``name`` is not a target of this adapter.
        """
        for target, vector in zip(self.targets, self._vectors.vectors):
            if target.name == name:
                return vector
        raise KeyError(f"{name!r} is not an (IA)^3 target of adapter {self.adapter_name!r}")

    # --- PEFT state dicts ---------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as PEFT's ``get_peft_model_state_dict`` returns it (same keys, shapes, dtypes).

        ``base_model.model.<target>.ia3_l`` per target and
        ``base_model.model.<module>.<param>`` per parameter of a module to save; tensors are
        detached (the live values, not copies).
        """
        out = {f"{PEFT_PREFIX}{t.name}.ia3_l": v.detach() for t, v in zip(self.targets, self._vectors.vectors)}
        for name, duplicate in zip(self.saved_modules.names, self.saved_modules.copies(), strict=True):
            for key, tensor in duplicate.state_dict().items():
                out[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach()
        return out

    def load_peft_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a PEFT ``IA3`` state dict (keys as :meth:`peft_state_dict`) into this adapter's tensors.

        Strict: every key must be present with the expected shape and no other key may be;
        nothing is copied unless all are.

        Raises:
            KeyError: missing or unexpected keys (named in the message).
            ValueError: a tensor of the wrong shape.
            RuntimeError: the adapter is merged (unmerge() first).
        """
        if self._merged:
            raise RuntimeError(f"(IA)^3 adapter {self.adapter_name!r} is merged; unmerge() before loading vectors")
        expected = self.peft_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"the state dict does not fit (IA)^3 adapter {self.adapter_name!r}: missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
            )
        for key, tensor in expected.items():
            given = state_dict[key]
            if tuple(given.shape) != tuple(tensor.shape):
                raise ValueError(f"{key!r} has shape {tuple(given.shape)}; expected {tuple(tensor.shape)}")
        with torch.no_grad():
            for key, tensor in expected.items():
                tensor.copy_(state_dict[key])

    # --- attach / detach ----------------------------------------------------------------
    def _check_can_attach(self) -> None:
        if hasattr(self.model, self.child_name):
            raise RuntimeError(
                f"an (IA)^3 adapter named {self.adapter_name!r} is already attached to {type(self.model).__name__} "
                f"(it has an attribute {self.child_name!r}); give each adapter its own adapter_name"
            )
        present = {id(module) for module in self.model.modules()}
        for target in self.targets:
            if id(target.module) not in present:
                raise RuntimeError(
                    f"{target.name!r} is no longer a module of the model; build the adapter again for the model as it is now"
                )
        self.saved_modules.check_can_attach()

    def _install(self, undo: UndoStack) -> None:
        freeze_parameters(self.model, undo)
        register_child(self.model, self.child_name, self._vectors, undo)
        key = id(self)
        with scaling.lock:
            for index, target in enumerate(self.targets):
                entry = scaling._Entry(key, self._vectors.vectors, str(index), target.feedforward)
                scaling.acquire(target.module, entry)
                undo.push(_release(target.module, key))
        self.saved_modules.install(undo)
        undo.push(self._forget_merge)

    def _forget_merge(self) -> None:
        self._merged = False  # scaling.release() already unmerged each module

    # --- switching ---------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """A context in which the model computes its base outputs.

        The vectors and the modules to save are switched off in the current thread (and async
        task) only (as ``Attachment.disabled``). A merged adapter cannot be left out of one
        thread's forward, so the two exclude each other: this raises while the adapter is
        merged, and :meth:`merge` raises while a ``disabled()`` block is open in any thread.

        Raises:
            RuntimeError: the adapter is merged (unmerge() first).
        """
        with self._disabled_blocks.open(scaling.lock, lambda: self._merged), self.saved_modules.disabled(), \
                super().disabled():
            yield

    # --- merging -----------------------------------------------------------------------------
    @property
    def is_merged(self) -> bool:
        return self._merged

    def merge(self) -> None:
        """Fold the vectors into the targets' weights (and regular targets' biases), in place.

        While merged the hooks skip this adapter's vectors, so nothing is scaled twice; the
        vectors would get no gradient, so a forward of a target in training mode with grad
        enabled raises (merging is for inference). The original tensors are kept and copied
        back on :meth:`unmerge` or detach: bit-exact.

        Raises:
            RuntimeError: not attached, inside :meth:`disabled` in this or another thread / task
                (a merged adapter always applies), or a target's weight is currently holding a
                merged LoRA update.
        """
        with scaling.lock:
            if not self.is_attached:
                raise RuntimeError(f"(IA)^3 adapter {self.adapter_name!r} is not attached")
            if self._merged:
                return
            self._disabled_blocks.check_closed(self.is_enabled, "merge it")
            check_no_other_merge(self.model, {target.name: target.module for target in self.targets}, "(IA)^3")
            for found in self._scalings():
                found.merge(id(self))
            self._merged = True

    def unmerge(self) -> None:
        """Restore the targets' original weights and biases (no-op when not merged)."""
        with scaling.lock:
            if self._merged:
                for found in self._scalings():
                    found.unmerge(id(self))
                self._merged = False

    def _scalings(self) -> list[scaling.ModuleScaling]:
        """The shared scaling of each target (this adapter is attached)."""
        scalings = []
        for target in self.targets:
            found = scaling.scaling_of(target.module)
            assert found is not None  # acquired by _install, released by detach
            scalings.append(found)
        return scalings

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return f"IA3Attachment({self.adapter_name!r}, {len(self.targets)} targets, {state})"


def _release(module: nn.Module, key: int) -> Callable[[], None]:
    def action() -> None:
        scaling.release(module, key)

    return action



def attach_ia3(
    model: nn.Module, config: IA3Config | str | os.PathLike[str], adapter_name: str = "default"
) -> IA3Attachment:
    """Build an (IA)^3 adapter for ``model``; attach it with ``with``, ``@`` or ``.attach()``.

    Targets are selected and the vectors built here; nothing about ``model`` changes until
    the adapter is attached. The vectors of several (IA)^3 adapters on one module multiply.

    Args:
        model: any ``nn.Module``; for the family defaults of ``target_modules`` and
            ``feedforward_modules``, a transformers model.
        config: the :class:`IA3Config`, or where an (IA)^3 adapter was saved, loaded frozen
            (see :func:`~prefix_hooks.core.checkpoints.built_or_loaded`).
        adapter_name: a Python identifier naming the adapter (its vectors are registered
            under the model as ``ia3_hooks_<adapter_name>`` while attached).

    Returns:
        The (not yet attached) :class:`IA3Attachment`.

    Raises:
        TypeError: ``config`` is not an :class:`IA3Config`.
        ValueError: the targets or modules to save match nothing, or a target is not an
            ``nn.Linear`` / transformers ``Conv1D``.

    Example:
        >>> with attach_ia3(model, IA3Config()) as handle:   # family default targets
        ...     trainer.train()
        ...     handle.merge()                              # fast inference inside the block
        >>> # here `model` is exactly the model it was before
    """
    return built_or_loaded(model, config, IA3Attachment, adapter_name)
