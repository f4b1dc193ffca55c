"""The benchmark scenarios, each run for the base model, our handles and PEFT's models.

Every scenario measures all contenders of one model in one :func:`~benchmarks.measure.interleave`
call and returns one :class:`Row` per method: the base model's median, ours, PEFT's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import peft
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, LlamaConfig, PreTrainedModel

from benchmarks.measure import Measure, Operation, Sample, elapsed_seconds, interleave, peak_allocated_bytes, sample
from benchmarks.methods import Method
from benchmarks.models import PAD_TOKEN_ID, random_tokens
from prefix_hooks import Attachment, LoraConfig, attach_lora

INPUT_SEED = 1
LEARNING_RATE = 1e-3
PARITY_ATOL = 1e-3
"""Ours and PEFT must agree this closely, or they do not hold the same weights."""


@dataclass(frozen=True)
class Workload:
    """Sizes and repeat counts of one benchmark run."""

    batch: int
    seq_len: int
    prompt_lens: tuple[int, ...]
    new_tokens: int
    repeats: int
    warmup: int
    attach_repeats: int
    skeleton: tuple[int, int] = (32, 4096)
    """Layers and width of the meta-device llama that LoRA is attached to in :func:`lora_on_meta_skeleton`."""
    decode_contexts: tuple[int, ...] = (32, 1024)
    """Prefill lengths of the decode-loop scenario (:func:`benchmarks.decode.decode_rows`)."""
    decode_steps: int = 16
    """Single-token forward steps per timed decode loop."""


CausalLM = PreTrainedModel | peft.PeftModel
"""What the operations run: a base model or a PEFT model (both forward and ``generate()`` alike)."""


class Ratio(NamedTuple):
    """Paired ratio of two contenders: the median and quartiles of their per-round ratios.

    Both ran in every round (see :func:`~benchmarks.measure.interleave`), so the ratio of a
    round cancels slow drift in machine load that the ratio of two medians keeps.
    With one round, all three are that round's ratio.
    """

    median: float
    low: float
    """First quartile."""
    high: float
    """Third quartile."""

    @classmethod
    def paired(cls, numerators: list[float], denominators: list[float]) -> Ratio:
        ratios = [top / bottom for top, bottom in zip(numerators, denominators, strict=True)]
        if len(ratios) < 2:
            return cls(ratios[0], ratios[0], ratios[0])
        low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(median, low, high)


@dataclass(frozen=True)
class Row:
    """One table row: medians for the base model (``None`` where it has no counterpart), ours, PEFT,
    and the paired ratios ours/base, PEFT/base and ours/PEFT (see :class:`Ratio`)."""

    model: str
    scenario: str
    method: str
    unit: str
    base: float | None
    ours: float
    peft: float | None
    ours_base: Ratio | None
    peft_base: Ratio | None
    ours_peft: Ratio | None


NOISE_FLOOR = "A/A: base again"
"""Method label of the control row: the base model measured twice per round, as two contenders.

Its ratio to the base is 1 by construction, so its median's distance from 1 and its
interquartile range show how far this run's ratios can be trusted (the noise floor)."""


class Contender(NamedTuple):
    """Who runs: ``kind`` is ``"base"``, ``"base again"`` (the A/A control), ``"ours"``,
    ``"ours+build"`` or ``"peft"``; no ``method`` for the base."""

    kind: str
    method: str = ""


@dataclass
class Contenders:
    """One model's base instance, our handles on it and PEFT's counterparts, by method name.

    Our handles are attached only around each measured call, so the base is measured
    on the same instance with nothing attached. Each PEFT model wraps its own copy.
    """

    model_name: str
    base: PreTrainedModel
    handles: dict[str, Attachment]
    peft_models: dict[str, peft.PeftModel]

    def all_models(self) -> list[CausalLM]:
        return [self.base, *self.peft_models.values()]

    def only(self, names: list[str]) -> Contenders:
        """The same contenders restricted to the methods ``names``."""
        return Contenders(
            self.model_name,
            self.base,
            {name: self.handles[name] for name in names},
            {name: self.peft_models[name] for name in names},
        )


OperationFactory = Callable[[CausalLM, list[nn.Parameter]], Operation]
"""Builds the operation for a model and its trainable (adapter) parameters; the base gets none."""
Bound = tuple[Operation, Attachment | None]
"""An operation and the handle to attach around it (``None``: run as is)."""


def contender_operations(contenders: Contenders, factory: OperationFactory) -> dict[Contender, Bound]:
    """The same operation for the base, the base again (the A/A control, see :data:`NOISE_FLOOR`),
    each of our handles and each PEFT model, in that order."""
    base = contenders.base
    operations: dict[Contender, Bound] = {Contender("base"): (factory(base, []), None)}
    operations[Contender("base again")] = (factory(base, []), None)
    for name, handle in contenders.handles.items():
        operations[Contender("ours", name)] = (factory(base, list(handle.parameters())), handle)
        peft_model = contenders.peft_models[name]
        trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
        operations[Contender("peft", name)] = (factory(peft_model, trainable), None)
    return operations


def measured(operations: dict[Contender, Bound], measure: Measure) -> dict[Contender, Sample]:
    """Each operation as a sample of ``measure``, its handle attached around it."""
    return {contender: sample(measure, operation, handle) for contender, (operation, handle) in operations.items()}


def rows_from(
    model_name: str,
    recorded: dict[Contender, list[float]],
    scenario: str,
    unit: str,
    convert: Callable[[float], float],
    ours_kind: str = "ours",
) -> list[Row]:
    """One row per method in ``recorded``: medians and paired ratios of the ``convert``-ed values
    (e.g. seconds to ms, or to tokens/s: the ratio of the converted values, so higher tokens/s is a higher ratio).

    The base column is empty when ``recorded`` has no base model; ``ours_kind`` picks
    which of our contenders fills the prefix_hooks column.
    """
    values = {contender: [convert(value) for value in samples] for contender, samples in recorded.items()}
    base = values.get(Contender("base"))
    methods = [contender.method for contender in recorded if contender.kind == "peft"]
    rows = []
    again = values.get(Contender("base again"))
    if base is not None and again is not None:
        rows.append(
            Row(
                model_name,
                scenario,
                NOISE_FLOOR,
                unit,
                base=statistics.median(base),
                ours=statistics.median(again),
                peft=None,
                ours_base=Ratio.paired(again, base),
                peft_base=None,
                ours_peft=None,
            )
        )
    for name in methods:
        ours, theirs = values[Contender(ours_kind, name)], values[Contender("peft", name)]
        rows.append(
            Row(
                model_name,
                scenario,
                name,
                unit,
                base=None if base is None else statistics.median(base),
                ours=statistics.median(ours),
                peft=statistics.median(theirs),
                ours_base=None if base is None else Ratio.paired(ours, base),
                peft_base=None if base is None else Ratio.paired(theirs, base),
                ours_peft=Ratio.paired(ours, theirs),
            )
        )
    return rows


def milliseconds(seconds: float) -> float:
    return seconds * 1e3


def mebibytes(num_bytes: float) -> float:
    return num_bytes / 2**20


# --- correctness guard ------------------------------------------------------------
class Parity(NamedTuple):
    """Max absolute logit differences on the forward batch."""

    gap: float
    """|ours - PEFT|: near 0 when both hold the same weights."""
    effect: float
    """|ours - base|: well above 0, or the prefix does nothing and the comparison is empty."""


@torch.no_grad()
def parity(contenders: Contenders, workload: Workload) -> dict[str, Parity]:
    """Check, per method, that ours and PEFT compute the same function, one the prefix changes.

    Raises:
        AssertionError: a gap above ``PARITY_ATOL``, or no effect of the prefix.
    """
    input_ids = random_tokens(contenders.base, workload.batch, workload.seq_len, INPUT_SEED)  # (B, T)
    base = contenders.base(input_ids=input_ids).logits  # (B, T, V)
    results: dict[str, Parity] = {}
    for name, handle in contenders.handles.items():
        with handle:
            ours = contenders.base(input_ids=input_ids).logits  # (B, T, V)
        theirs = contenders.peft_models[name](input_ids=input_ids).logits  # (B, [P +] T, V)
        theirs = theirs[:, theirs.shape[1] - ours.shape[1] :]  # PEFT keeps the virtual tokens' logits
        result = Parity(gap=(ours - theirs).abs().max().item(), effect=(ours - base).abs().max().item())
        where = f"{contenders.model_name}/{name}"
        assert result.gap < PARITY_ATOL, f"{where}: ours and PEFT differ by {result.gap}"
        assert result.effect > PARITY_ATOL, f"{where}: the prefix changes the logits by only {result.effect}"
        results[name] = result
    return results


# --- 1. forward ---------------------------------------------------------------------
def forward_latency(contenders: Contenders, workload: Workload) -> list[Row]:
    """Eval-mode forward under ``torch.no_grad()``, ``batch x seq_len`` tokens, in ms."""
    input_ids = random_tokens(contenders.base, workload.batch, workload.seq_len, INPUT_SEED)  # (B, T)

    def factory(model: CausalLM, trainable: list[nn.Parameter]) -> Operation:
        @torch.no_grad()
        def forward() -> None:
            model(input_ids=input_ids)

        return forward

    samples = measured(contender_operations(contenders, factory), elapsed_seconds)
    recorded = interleave(samples, workload.repeats, workload.warmup)
    return rows_from(
        contenders.model_name, recorded, f"forward {workload.batch}×{workload.seq_len}", "ms", milliseconds
    )


# --- 2 and 5. training step: time and peak memory -----------------------------------------
def training_step_factory(input_ids: torch.Tensor) -> OperationFactory:
    """Forward + backward + ``AdamW`` step on the adapter parameters, ``labels = input_ids``.

    With no adapter parameters (the base model) the step backpropagates to the input
    embeddings instead: the gradient work through every layer that any adapter needs,
    without weight gradients and without an optimizer step.
    """

    def factory(model: CausalLM, trainable: list[nn.Parameter]) -> Operation:
        if not trainable:
            embed = model.get_input_embeddings()

            def base_step() -> None:
                embeds = embed(input_ids).detach().requires_grad_(True)  # (B, T, hidden)
                model(inputs_embeds=embeds, labels=input_ids).loss.backward()

            return base_step

        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)

        def adapter_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()

        return adapter_step

    return factory


@contextmanager
def train_mode(contenders: Contenders) -> Iterator[None]:
    """Every model of ``contenders`` in train mode inside, eval mode after."""
    for model in contenders.all_models():
        model.train()
    try:
        yield
    finally:
        for model in contenders.all_models():
            model.eval()


def training_step(contenders: Contenders, workload: Workload) -> list[Row]:
    """Time of a training step (see :func:`training_step_factory`) in ms, then its peak memory in MiB.

    The memory is measured once per contender after the timed rounds, so AdamW's state
    already exists (see :data:`~benchmarks.measure.MEMORY_METHOD`).
    """
    input_ids = random_tokens(contenders.base, workload.batch, workload.seq_len, INPUT_SEED)  # (B, T)
    operations = contender_operations(contenders, training_step_factory(input_ids))
    with train_mode(contenders):
        times = interleave(measured(operations, elapsed_seconds), workload.repeats, workload.warmup)
        once = {contender: bound for contender, bound in operations.items() if contender.kind != "base again"}
        peaks = interleave(measured(once, peak_allocated_bytes), repeats=1, warmup=0)  # deterministic: no control
    scenario = f"train step {workload.batch}×{workload.seq_len}"
    return [
        *rows_from(contenders.model_name, times, scenario, "ms", milliseconds),
        *rows_from(contenders.model_name, peaks, f"{scenario} peak memory", "MiB", mebibytes),
    ]


# --- 3. greedy generation -------------------------------------------------------------
def generation(contenders: Contenders, workload: Workload, prompt_len: int) -> list[Row]:
    """Greedy ``generate()`` of exactly ``new_tokens`` after a ``prompt_len`` prompt, batch 1, in tokens/s.

    Tokens/s is ``new_tokens`` over the wall time of the whole ``generate()`` call (prefill included).
    """
    new_tokens = workload.new_tokens
    input_ids = random_tokens(contenders.base, 1, prompt_len, INPUT_SEED)  # (1, T)
    attention_mask = torch.ones_like(input_ids)  # (1, T), 1 = real token

    def factory(model: CausalLM, trainable: list[nn.Parameter]) -> Operation:
        if not isinstance(model, (GenerationMixin, peft.PeftModelForCausalLM)):
            raise TypeError(f"{type(model).__name__} has no generate()")

        def generate() -> None:
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                min_new_tokens=new_tokens,
                max_new_tokens=new_tokens,
                pad_token_id=PAD_TOKEN_ID,
            )  # (1, T + new_tokens)
            assert output.shape[1] == prompt_len + new_tokens, f"generated {output.shape[1] - prompt_len} tokens"

        return generate

    samples = measured(contender_operations(contenders, factory), elapsed_seconds)
    recorded = interleave(samples, workload.repeats, workload.warmup)
    scenario = f"generate {new_tokens} after {prompt_len}"
    return rows_from(contenders.model_name, recorded, scenario, "tokens/s", lambda seconds: new_tokens / seconds)


# --- 4. attach + detach ---------------------------------------------------------------
def _handle_round_trip(handle: Attachment) -> Operation:
    def round_trip() -> None:
        handle.attach()
        handle.detach()

    return round_trip


def _build_round_trip(method: Method, model: nn.Module) -> Operation:
    def round_trip() -> None:
        with method.ours(model):
            pass

    return round_trip


def _peft_round_trip(method: Method, model: nn.Module) -> Operation:
    """``get_peft_model`` then PEFT's way back (``method.unwrap_peft``), restoring ``requires_grad``."""

    def round_trip() -> None:
        flags = [parameter.requires_grad for parameter in model.parameters()]
        restored = method.unwrap_peft(peft.get_peft_model(model, method.peft_config()))
        for parameter, flag in zip(restored.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)

    return round_trip


def attach_detach(
    model_name: str,
    base: nn.Module,
    handles: Mapping[str, Attachment],
    peft_bases: Mapping[str, nn.Module],
    methods: Mapping[str, Method],
    workload: Workload,
) -> list[Row]:
    """Attach + detach, in ms: two rows per method, both against PEFT's round trip.

    ``attach + detach`` times ``handle.attach(); handle.detach()`` on a built handle;
    ``build + attach + detach`` also builds the handle (config resolution, encoder
    initialisation), as ``get_peft_model`` does. PEFT runs on ``peft_bases``, unwrapped
    copies that are left as they were.
    """
    operations: dict[Contender, Operation] = {}
    for name, method in methods.items():
        operations[Contender("ours", name)] = _handle_round_trip(handles[name])
        operations[Contender("ours+build", name)] = _build_round_trip(method, base)
        operations[Contender("peft", name)] = _peft_round_trip(method, peft_bases[name])
    samples = {key: sample(elapsed_seconds, operation) for key, operation in operations.items()}
    recorded = interleave(samples, workload.attach_repeats, workload.warmup)
    return [
        *rows_from(model_name, recorded, "attach + detach", "ms", milliseconds),
        *rows_from(model_name, recorded, "build + attach + detach", "ms", milliseconds, ours_kind="ours+build"),
    ]


# --- 4b. LoRA on a large skeleton ---------------------------------------------------------
SKELETON_REPEATS = 5


def lora_on_meta_skeleton(workload: Workload) -> list[Row]:
    """Build + attach + detach of LoRA r=8 on every linear layer of a llama skeleton on the meta
    device (no weights allocated), against ``get_peft_model`` + ``unload()``, in ms."""
    layers, width = workload.skeleton
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 128),
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    def ours() -> None:
        with attach_lora(model, LoraConfig(r=8, target_modules="all-linear")):
            pass

    def theirs() -> None:
        peft_config = peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
        peft.get_peft_model(model, peft_config).unload()

    samples = {
        Contender("ours", "lora r=8 all-linear"): sample(elapsed_seconds, ours),
        Contender("peft", "lora r=8 all-linear"): sample(elapsed_seconds, theirs),
    }
    recorded = interleave(samples, SKELETON_REPEATS, warmup=1)
    name = f"llama {layers}×{width} (meta)"
    return rows_from(name, recorded, "build + attach + detach", "ms", milliseconds)
