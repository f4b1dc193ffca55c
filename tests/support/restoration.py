"""What "detach restores exactly" means, as a test can check it: a full snapshot of a model and
the process-wide registries, its comparison, and random programs of lifecycle operations.

``snapshot(model)`` records classes, ``__dict__`` (hook dicts included), parameter identity,
order, flags and bits, buffers, the config and transformers' attention and mask registries;
``assert_untouched(model, before)`` names every difference. ``ProgramRun`` executes a program
of attach / detach / forward / backward / ``with`` / ``disabled()`` blocks and checks after
every step. Shared by every method's lifecycle tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefix_hooks import Attachment, PrefixTuningConfig, attachments_of
from prefix_hooks.prefix import interposer as attention_interposer

NUM_VIRTUAL_TOKENS = 3
BSZ = 2
SEQ_LEN = 5
LIFECYCLE_FAMILIES = ("llama", "gpt2", "opt", "gpt_neox", "qwen3")
IMPLEMENTATIONS = ("eager", "sdpa")
THREAD_ITERATIONS = 100
THREAD_SWITCH_INTERVAL = 1e-6  # seconds; frequent GIL hand-overs make the forwards interleave
THREAD_BATCHES: dict[int, dict[str, Any]] = {  # batch size -> random_batch arguments
    1: {"length": 4, "seed": 11},
    3: {"length": 7, "seed": 12, "left_pad": [0, 2, 0]},
}
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)
GLOBAL_HOOK_DICTS = tuple(name for name in vars(nn.modules.module) if name.startswith("_global_"))
CUSTOM_ATTENTION = "my_attention"
REGISTRIES = {
    "ALL_ATTENTION_FUNCTIONS": ALL_ATTENTION_FUNCTIONS,
    "ALL_MASK_ATTENTION_FUNCTIONS": ALL_MASK_ATTENTION_FUNCTIONS,
}


# --- snapshot --------------------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything detach promises to restore, as plain data compared with ``==``.

    Objects are recorded by ``id``; ``keepalive`` holds them so no id can be reused.
    """

    parts: dict[str, Any]
    keepalive: list[object] = field(default_factory=list, compare=False, repr=False)


def _contents(value: object) -> object:
    """A container's entries by identity (dict order included), or the object's identity."""
    if isinstance(value, dict):
        return ("dict", id(value), tuple((key, id(item)) for key, item in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", id(value), tuple(sorted(map(repr, value))))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, id(value), tuple(map(id, value)))
    return id(value)


def _tensor_bits(tensor: torch.Tensor) -> tuple[object, ...]:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return (tensor.dtype, tuple(tensor.shape), data.view(torch.uint8).numpy().tobytes())


def _registry_record(registry: Any, keep: list[object]) -> dict[str, object]:
    keep.extend([*vars(registry).values(), *dict(registry).values(), *type(registry)._global_mapping.values()])
    return {
        "vars": {name: _contents(value) for name, value in vars(registry).items()},
        "mapping": tuple((key, id(function)) for key, function in dict(registry).items()),
        "global_mapping": _contents(type(registry)._global_mapping),
    }


def snapshot(model: PreTrainedModel) -> Snapshot:
    """Record the model (and the process-wide registries) exactly enough to detect any trace.

    Per module (every path, duplicates included): class, ``__dict__`` keys in order, the
    identity of every ``__dict__`` value and, for containers (parameters, buffers,
    children, every hook dict), their entries by identity. Model-wide: parameter names,
    identity, order, ``requires_grad`` and ``.grad``; buffers; ``state_dict()`` bit for
    bit; ``config.to_dict()``; the attention registries; torch's global module hooks.
    """
    keep: list[object] = []
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        keep.extend(vars(module).values())
        for container in vars(module).values():
            if isinstance(container, dict):
                keep.extend(container.values())
            elif isinstance(container, (list, tuple)):
                keep.extend(container)
        modules[name] = {
            "class": type(module),
            "dict_keys": tuple(vars(module)),
            "dict": {key: _contents(value) for key, value in vars(module).items()},
        }
    parameters = list(model.named_parameters())
    buffers = list(model.named_buffers())
    keep.extend(parameter for _, parameter in parameters)
    keep.extend(parameter.grad for _, parameter in parameters)
    keep.extend(buffer for _, buffer in buffers)
    globals_ = {name: getattr(nn.modules.module, name) for name in GLOBAL_HOOK_DICTS}
    keep.extend(globals_.values())
    parts = {
        "modules": modules,
        "parameters": tuple(
            (name, id(p), p.requires_grad, id(p.grad), p.dtype, tuple(p.shape)) for name, p in parameters
        ),
        "buffers": tuple((name, id(buffer)) for name, buffer in buffers),
        "state_dict": {key: _tensor_bits(tensor) for key, tensor in model.state_dict().items()},
        "state_dict_order": tuple(model.state_dict()),
        "config": model.config.to_dict(),
        "attn_implementation": model.config._attn_implementation,
        "registries": {name: _registry_record(registry, keep) for name, registry in REGISTRIES.items()},
        "global_module_hooks": {name: _contents(value) for name, value in globals_.items()},
        "attachments": tuple(map(id, attachments_of(model))),
        "interposer_installed": attention_interposer.is_installed(),
    }
    return Snapshot(parts, keep)


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """Paths (``modules/model.layers.0.self_attn/dict/_forward_hooks``) where two snapshots differ."""
    found: list[str] = []

    def walk(path: str, old: object, new: object) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in old.keys() | new.keys():
                walk(f"{path}/{key}", old.get(key, "<missing>"), new.get(key, "<missing>"))
        elif old != new:
            found.append(path)

    walk("", before.parts, after.parts)
    return sorted(found)


def assert_untouched(model: PreTrainedModel, before: Snapshot) -> None:
    changed = differences(before, snapshot(model))
    assert not changed, f"the model or the registries differ from before at: {changed[:20]}"


# --- factories ----------------------------------------------------------------------------
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def warm_up(model: nn.Module) -> None:
    """Let transformers install its lazy output-capturing hooks before any snapshot."""
    with torch.no_grad():
        model(**random_batch(1, 3), output_attentions=True, output_hidden_states=True)


def detach_everything(model: nn.Module) -> None:
    """Test hygiene after a failure: detach whatever is still attached, newest first."""
    for attachment in reversed(attachments_of(model)):
        while attachment.is_attached:
            attachment.detach()


@pytest.fixture
def make_warm_model() -> Iterator[Callable[..., PreTrainedModel]]:
    """Factory: ``make_warm_model(family, attn="sdpa", seed=0, frozen_mask=0b0110)``.

    Parameter ``i`` starts with ``requires_grad=False`` when bit ``i % 8`` of
    ``frozen_mask`` is set, so restoring flags (not resetting them) is observable.
    """
    built: list[nn.Module] = []

    def make(family: str, attn: str = "sdpa", seed: int = 0, frozen_mask: int = 0b0110) -> PreTrainedModel:
        model = build_model(family, attn, seed)
        for index, parameter in enumerate(model.parameters()):
            if frozen_mask >> (index % 8) & 1:
                parameter.requires_grad_(False)
        warm_up(model)
        built.append(model)
        return model

    yield make
    for model in built:
        detach_everything(model)


def prefix_config(**overrides: Any) -> PrefixTuningConfig:
    return PrefixTuningConfig(**{"num_virtual_tokens": NUM_VIRTUAL_TOKENS, **overrides})


# --- 1. no trace, over random sequences of operations --------------------------------------
class Interrupted(Exception):
    """Raised inside a block by a test program."""


LEAVES = st.sampled_from(["attach", "detach", "forward", "forward", "backward"])
BLOCKS = st.tuples(st.sampled_from(["with", "disabled"]), st.sampled_from(["normal", "error", "interrupt"]))
PROGRAMS = st.lists(
    st.recursive(LEAVES, lambda body: st.tuples(BLOCKS, st.lists(body, max_size=3)), max_leaves=10),
    min_size=1,
    max_size=6,
)
# programs every run checks, whatever hypothesis draws
NESTED_REATTACH = [
    (("with", "normal"), [
        "forward",
        (("with", "normal"), ["forward", (("disabled", "normal"), ["forward"])]),
        "forward",
    ]),
    "forward",
]
MANUAL_ACROSS_INTERRUPT = [
    "attach",
    (("with", "interrupt"), ["attach", "forward", (("disabled", "error"), ["forward"]), "backward"]),
    "forward", "detach", "forward", "detach", "forward",
]
ERRORS_EVERYWHERE = [
    (("with", "error"), ["backward", "forward"]),
    (("disabled", "interrupt"), [(("with", "normal"), ["forward"]), (("with", "interrupt"), ["forward"])]),
    "forward",
]
EXIT_ERRORS: dict[str, type[BaseException] | None] = {
    "normal": None, "error": Interrupted, "interrupt": KeyboardInterrupt,
}


class ProgramRun:
    """Runs a program of lifecycle operations, checking the model after each one."""

    def __init__(self, model: PreTrainedModel, handle: Attachment, before: Snapshot) -> None:
        self.model, self.handle, self.before = model, handle, before
        self.batch = random_batch(BSZ, SEQ_LEN, seed=1, left_pad=[0, 2])
        self.base = logits(model, self.batch)
        self.manual = 0  # attach() calls not yet matched by detach()
        self.scoped = 0  # enclosing `with handle:` blocks
        self.disabled = 0  # enclosing `with handle.disabled():` blocks
        with handle:
            self.prefixed = logits(model, self.batch)
        assert not torch.equal(self.prefixed, self.base)

    @property
    def attached(self) -> bool:
        return self.manual + self.scoped > 0

    def run(self, program: list[Any]) -> None:
        for operation in program:
            self.step(operation)
            self.check()

    def step(self, operation: Any) -> None:
        if operation == "attach":
            self.handle.attach()
            self.manual += 1
        elif operation == "detach":
            if self.manual:
                self.handle.detach()
                self.manual -= 1
        elif operation == "forward":
            expected = self.prefixed if self.attached and not self.disabled else self.base
            assert torch.equal(logits(self.model, self.batch), expected)
        elif operation == "backward":
            if self.attached and not self.disabled:
                self.model(**self.batch, labels=self.batch["input_ids"]).loss.backward()
        else:
            (kind, exit_kind), body = operation
            self.block(kind, EXIT_ERRORS[exit_kind], body)

    def block(self, kind: str, error: type[BaseException] | None, body: list[Any]) -> None:
        counter = "scoped" if kind == "with" else "disabled"
        context = self.handle if kind == "with" else self.handle.disabled()
        expectation = pytest.raises(error) if error else contextlib.nullcontext()
        with expectation, context:
            setattr(self, counter, getattr(self, counter) + 1)
            try:
                self.run(body)
                if error is not None:
                    raise error("raised inside the block")
            finally:
                setattr(self, counter, getattr(self, counter) - 1)

    def check(self) -> None:
        assert self.handle.is_attached == self.attached
        assert attachments_of(self.model) == ([self.handle] if self.attached else [])
        model_parameters = {id(p) for p in self.model.parameters()}
        assert all((id(p) in model_parameters) == self.attached for p in self.handle.parameters())
        if not self.attached:
            assert_untouched(self.model, self.before)

    def finish(self) -> None:
        while self.manual:
            self.handle.detach()
            self.manual -= 1
        assert_untouched(self.model, self.before)
