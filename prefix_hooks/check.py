"""``python -m prefix_hooks.check``: check every method on every family against the installed transformers.

Each method (prefix tuning, LoRA, prompt tuning, P-tuning, IA3) is attached to a tiny, seeded
model of each supported family (``prefix_hooks._tiny_models``; built from configs, nothing is
downloaded), with adapter weights that are clearly not a no-op, and the promises are checked:

* ``changes``: the adapter changes the output (by more than :data:`MIN_EFFECT`);
* ``cache``: incremental decoding through ``forward`` equals one full forward (families that
  decode with a cache): prefill, then one-token steps passing the returned cache under the
  keyword the installed ``forward`` takes, with no ``position_ids``, so the library has to
  place every step itself;
* ``generate``: greedy ``generate()`` with the cache equals it without (tokens, and the logits
  of every new token);
* ``detach``: after detach the outputs and every ``state_dict`` tensor are bit-exactly what
  they were before attaching.

Cells a method refuses by design (:data:`REFUSED`: prompt methods on models without token
inputs, and llava) must raise before touching the model. Errors are absolute, float32, and
must stay within ``--tolerance`` (``detach`` must be exact). The command prints a family x
method table with the worst error per cell and exits non-zero on any failure or unexpected
exception.

Example::

    python -m prefix_hooks.check                                  # everything: ~6 s, plus ~7 s of imports
    python -m prefix_hooks.check --families llama,t5 --methods prefix,lora
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import transformers
from torch import nn

import prefix_hooks
from prefix_hooks import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    _tiny_models,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
    supported,
)
from prefix_hooks.core.attachment import Attachment
from prefix_hooks.core.transformers_compat import cache_keyword, forward_parameters, output_cache

__all__ = [
    "INVARIANTS",
    "METHODS",
    "MIN_EFFECT",
    "REFUSED",
    "TOLERANCE",
    "CellResult",
    "CheckReport",
    "main",
    "run_check",
]

METHODS: tuple[str, ...] = ("prefix", "lora", "prompt", "p-tuning", "ia3")
INVARIANTS: tuple[str, ...] = ("changes", "cache", "generate", "detach", "refusal")
REFUSED: dict[str, frozenset[str]] = {
    # prompt methods prepend token embeddings: no token inputs (vision, speech), or llava's
    # image placeholders, which a prepended prompt would misalign
    "prompt": frozenset({"vit", "deit", "dinov2", "whisper", "llava"}),
    "p-tuning": frozenset({"vit", "deit", "dinov2", "whisper", "llava"}),
}
"""Method -> families it refuses by design, with a ``ValueError`` raised before touching the model."""

TOLERANCE = 1e-4
"""Default absolute tolerance (float32) for ``cache`` and ``generate``."""
MIN_EFFECT = 1e-3
"""The adapter must move some output by more than this, or the other invariants prove nothing."""
DECODE_STEPS = 3
"""One-token steps after the prefill in the ``cache`` invariant."""
NEW_TOKENS = 3
"""Tokens ``generate()`` adds in the ``generate`` invariant."""
_ADAPTER_SEED = 7

Status = Literal["ok", "fail", "error", "refused"]


@dataclass
class CellResult:
    """One (family, method) cell of the check.

    Attributes:
        family, method: the cell (``family`` is a model type).
        variant: the family's tiny-model variant (``prefix_hooks._tiny_models.VARIANTS``), or "".
        status: ``ok``; ``fail`` (an invariant broke); ``error`` (an unexpected exception);
            ``refused`` (refused by design, before touching the model).
        errors: invariant -> the worst absolute error measured (``changes``: the largest change
            the adapter made, which must *exceed* :data:`MIN_EFFECT`).
        failed: the invariants that broke, in checking order.
        message: the exception (``error``), the refusal (``refused``) or what broke (``fail``).
        warnings: distinct warnings raised while checking the cell (not failures).
        seconds: wall time of the cell.
    """

    family: str
    method: str
    variant: str = ""
    status: Status = "ok"
    errors: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def row(self) -> str:
        """The table row: the family, or ``family:variant``."""
        return f"{self.family}:{self.variant}" if self.variant else self.family

    @property
    def worst(self) -> float:
        """The worst error over the invariants that compare two computations (0.0 when none ran)."""
        measured = [error for name, error in self.errors.items() if name != "changes"]
        return max(measured, default=0.0)

    def text(self) -> str:
        """The table cell: ``1.2e-07``, ``FAIL 3.1e-01 (cache)``, ``ERROR TypeError: ...`` or ``refused``."""
        if self.status == "refused":
            return "refused"
        if self.status == "error":
            return f"ERROR {self.message}"
        if self.status == "fail":
            numbers = [self.errors[name] for name in self.failed if name in self.errors]
            number = f" {max(numbers):.1e}" if numbers else ""
            return f"FAIL{number} ({','.join(self.failed)})"
        return f"{self.worst:.1e}"


@dataclass
class CheckReport:
    """Every cell of one check, with the versions it ran against."""

    cells: list[CellResult]
    tolerance: float
    versions: dict[str, str]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No cell failed or raised unexpectedly."""
        return not self.problems()

    def problems(self) -> list[CellResult]:
        """The cells that failed or raised."""
        return [cell for cell in self.cells if cell.status in ("fail", "error")]

    def cell(self, family: str, method: str, variant: str = "") -> CellResult:
        """The result of ``method`` on ``family`` (its ``variant``, by default the plain tiny model).

        Raises:
            KeyError: the check did not run that cell.
        """
        for result in self.cells:
            if (result.family, result.method, result.variant) == (family, method, variant):
                return result
        raise KeyError(f"no cell {method} x {family}{':' + variant if variant else ''} in this report")

    def table(self, max_width: int = 34) -> str:
        """Families down, methods across; each cell's text cut to ``max_width`` characters."""
        families = list(dict.fromkeys(cell.row for cell in self.cells))
        methods = list(dict.fromkeys(cell.method for cell in self.cells))
        by_cell = {(cell.row, cell.method): cell.text() for cell in self.cells}

        def cut(text: str) -> str:
            return text if len(text) <= max_width else text[: max_width - 3] + "..."

        rows = [["family", *methods]]
        rows += [[family, *(cut(by_cell.get((family, method), "-")) for method in methods)] for family in families]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: counts per status, the time taken, and OK or FAILED."""
        statuses = [cell.status for cell in self.cells]
        counts = {status: statuses.count(status) for status in ("ok", "refused", "fail", "error")}
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"{verdict}: {len(self.cells)} cells, {counts['ok']} passed, {counts['refused']} refused by design, "
            f"{counts['fail']} failed, {counts['error']} errors (tolerance {self.tolerance:.0e}) "
            f"in {self.seconds:.1f} s"
        )

    def details(self) -> str:
        """What broke in every failing cell, in full, and the warnings seen (empty when there are none)."""
        lines = []
        for cell in self.problems():
            measured = ", ".join(f"{name} {error:.1e}" for name, error in cell.errors.items())
            lines.append(f"{cell.method} x {cell.row}: {cell.message}" + (f" [{measured}]" if measured else ""))
        seen: dict[str, list[str]] = {}
        for cell in self.cells:
            for text in cell.warnings:
                seen.setdefault(text, []).append(f"{cell.method} x {cell.row}")
        if seen:
            lines.append("notes (warnings seen while checking; not failures):")
        for text, where in seen.items():
            lines.append(f"  {', '.join(where[:3])}{' ...' if len(where) > 3 else ''}: {text}")
        return "\n".join(lines)


def versions() -> dict[str, str]:
    """The versions the check runs against."""
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prefix_hooks": prefix_hooks.__version__,
        "python": platform.python_version(),
    }


# --- adapters that matter --------------------------------------------------------------------
def _normal_weights(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _prefix(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3))
    _normal_weights(handle.encoder, generator)
    return handle


def _lora(model: nn.Module, generator: torch.Generator) -> Attachment:
    # init_lora_weights=False: B is not zero, so the adapter is not a no-op from the start
    return attach_lora(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))


def _prompt(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3))
    _normal_weights(handle.prompt_encoder, generator)
    return handle


def _p_tuning(model: nn.Module, generator: torch.Generator) -> Attachment:
    # the MLP's default (random) init already gives a prompt that matters
    return attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16))


def _ia3(model: nn.Module, generator: torch.Generator) -> Attachment:
    handle = attach_ia3(model, IA3Config())
    with torch.no_grad():  # 1 + N(0, 0.5^2): each vector clearly rescales
        for _, vector in handle.named_parameters():
            vector.copy_(1 + 0.5 * torch.randn(vector.shape, generator=generator))
    return handle


ADAPTERS: dict[str, Callable[[nn.Module, torch.Generator], Attachment]] = {
    "prefix": _prefix,
    "lora": _lora,
    "prompt": _prompt,
    "p-tuning": _p_tuning,
    "ia3": _ia3,
}
"""Method -> builds its (not yet attached) adapter on a model, with weights that matter."""


# --- what is compared ------------------------------------------------------------------------
def _output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits and the last (decoder) hidden state of one forward, flattened: fresh
    classification heads give logits ~1e-2, too small alone to show an adapter's effect."""
    with torch.no_grad():
        output: Any = model(**inputs, output_hidden_states=True)
    parts = [output.logits.flatten()] if isinstance(getattr(output, "logits", None), torch.Tensor) else []
    hidden = getattr(output, "decoder_hidden_states", None) or getattr(output, "hidden_states", None)
    if hidden:
        parts.append(hidden[-1].flatten())
    return torch.cat(parts)


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` (``inf`` when the shapes differ, ``nan`` propagates)."""
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def _bit_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """0.0 when ``a`` and ``b`` are bit-identical (same dtype, shape, values), else ``max |a - b|``,
    or ``inf`` where that is not positive (a NaN, a changed dtype or shape)."""
    if a.dtype == b.dtype and torch.equal(a, b):
        return 0.0
    difference = _max_difference(a, b) if a.dtype == b.dtype else math.inf
    return difference if difference > 0 else math.inf


def _state_difference(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """0.0 when both state dicts hold the same names with bit-identical tensors, else the largest
    difference (``inf`` for a missing or extra name)."""
    if before.keys() != after.keys():
        return math.inf
    return max((_bit_difference(tensor, after[name]) for name, tensor in before.items()), default=0.0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _incremental_error(model: nn.Module, family: str, inputs: Mapping[str, torch.Tensor]) -> float:
    """``max |logits|`` difference between one full forward and prefill + one-token steps.

    The cache goes back in under the keyword the installed ``forward`` takes; no
    ``position_ids`` are passed. Decoders get the attention mask of the tokens so far and
    llava its image with the prefill; encoder-decoders get their encoder inputs at every step.
    Only real (unpadded) positions are compared.
    """
    parameters = forward_parameters(model)
    keyword = cache_keyword(parameters)
    if keyword is None:
        raise TypeError(f"{type(model).__name__}.forward takes no cache argument; its parameters: {parameters}")
    stream_key = _tiny_models.stream_key(family)
    stream = inputs[stream_key]  # (B, T)
    if stream_key == "input_ids":  # decoders: the mask grows with the tokens; llava's image goes in the prefill
        mask = inputs.get("attention_mask")  # (B, T), 1 = real token
        prefill_only = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
        every_step = {}
    else:  # encoder-decoders: the encoder's inputs with every call
        mask = None
        prefill_only = {}
        every_step = {key: value for key, value in inputs.items() if key != stream_key}
    length = stream.shape[1]
    prefill = length - DECODE_STEPS

    def upto(end: int) -> dict[str, torch.Tensor]:
        return {} if mask is None else {"attention_mask": mask[:, :end]}

    with torch.no_grad():
        full = model(**inputs, use_cache=False).logits  # (B, T, V)
        first = {stream_key: stream[:, :prefill], **prefill_only, **every_step, **upto(prefill)}
        output = model(**first, use_cache=True)
        steps = [output.logits]
        for t in range(prefill, length):
            cache = {keyword: output_cache(output)}
            output = model(**{stream_key: stream[:, t : t + 1]}, **cache, **every_step, **upto(t + 1), use_cache=True)
            steps.append(output.logits)
    incremental = torch.cat(steps, dim=1)  # (B, T, V)
    if incremental.shape != full.shape:
        return math.inf
    real = mask.bool() if mask is not None else torch.ones(stream.shape, dtype=torch.bool)  # (B, T), True = real token
    return _max_difference(incremental[real], full[real])


def _greedy(model: nn.Module, prompt: Mapping[str, torch.Tensor], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate()``: ``(sequences (B, S), logits of the new tokens (N, B, V))``."""
    with torch.no_grad():
        result: Any = model.generate(  # type: ignore[operator]
            **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=_tiny_models.PAD, use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
        )
    return result.sequences, torch.stack(result.logits)


def _generate_error(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[float, bool]:
    """``(max |logits| difference, same tokens)`` between cached and uncached greedy generation."""
    prompt = {key: value for key, value in inputs.items() if key != "decoder_input_ids"}
    cached, cached_logits = _greedy(model, prompt, use_cache=True)
    uncached, uncached_logits = _greedy(model, prompt, use_cache=False)
    return _max_difference(cached_logits, uncached_logits), torch.equal(cached, uncached)


# --- one cell --------------------------------------------------------------------------------
def _check_cell(family: str, variant: str, method: str, tolerance: float) -> CellResult:
    result = CellResult(family, method, variant)
    phase = "build"  # what the cell is doing, so an unexpected exception says where it came from
    refused_by_design = family in REFUSED.get(method, frozenset())
    try:
        model = _tiny_models.build(family, variant=variant)
        inputs = _tiny_models.example_inputs(family)
        phase = "base forward"
        base = _output(model, inputs)
        state = _snapshot(model)
        torch.manual_seed(_ADAPTER_SEED)  # P-tuning's default init
        generator = torch.Generator().manual_seed(_ADAPTER_SEED)
        phase = "attach"
        if refused_by_design:
            return _check_refusal(result, model, inputs, base, state, generator)
        handle = ADAPTERS[method](model, generator)
        with handle:
            phase = "adapted forward"
            adapted = _output(model, inputs)
            if adapted.shape != base.shape:
                raise ValueError(f"the adapted output has {adapted.numel()} values, the base output {base.numel()}")
            result.errors["changes"] = _max_difference(adapted, base)
            if family in _tiny_models.GENERATING:
                phase = "cache"
                result.errors["cache"] = _incremental_error(model, family, inputs)
                phase = "generate"
                result.errors["generate"], same_tokens = _generate_error(model, inputs)
                if not same_tokens:
                    result.failed.append("generate")
                    result.message = "cached and uncached generate() chose different tokens"
            phase = "detach"
        phase = "restored forward"
        after = _output(model, inputs)
        result.errors["detach"] = max(_bit_difference(after, base), _state_difference(state, _snapshot(model)))
    except Exception as error:  # noqa: BLE001 - every exception is reported in the table
        result.status = "error"
        result.message = f"{type(error).__name__} ({phase}): {_first_line(error)}"
        return result
    _judge(result, tolerance)
    return result


def _check_refusal(
    result: CellResult,
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    base: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    generator: torch.Generator,
) -> CellResult:
    """A cell refused by design: attaching must raise ``ValueError`` and leave the model untouched."""
    try:
        handle = ADAPTERS[result.method](model, generator)
        handle.attach()
    except ValueError as error:
        result.message = _first_line(error)
        touched = max(_bit_difference(_output(model, inputs), base), _state_difference(state, _snapshot(model)))
        if touched:
            result.status, result.errors["refusal"], result.failed = "fail", touched, ["refusal"]
            result.message = f"the refusal changed the model: {result.message}"
        else:
            result.status = "refused"
        return result
    handle.detach()
    result.status, result.failed = "fail", ["refusal"]
    result.message = f"{result.method} attached to {result.family}, which it refuses by design"
    return result


def _judge(result: CellResult, tolerance: float) -> None:
    """Mark the invariants ``result.errors`` breaks; ``detach`` must be exact."""
    errors = result.errors
    broken = []
    if not errors.get("changes", 0.0) > MIN_EFFECT:
        change = errors.get("changes", 0.0)
        broken.append(("changes", f"the adapter changed the output by {change:.1e} <= {MIN_EFFECT:.0e}"))
    for name in ("cache", "generate"):
        if name in errors and not errors[name] <= tolerance:
            broken.append((name, f"{name} differs by {errors[name]:.1e} > {tolerance:.0e}"))
    if errors.get("detach", 0.0) != 0.0:
        broken.append(("detach", f"detach left outputs or state_dict changed by {errors['detach']:.1e}"))
    messages = [result.message] if result.message else []
    for name, message in broken:
        if name not in result.failed:
            result.failed.append(name)
            messages.append(message)
    result.failed.sort(key=INVARIANTS.index)
    if result.failed:
        result.status = "fail"
        result.message = "; ".join(messages)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


def _cut(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warning_text(record: warnings.WarningMessage) -> str:
    return _cut(f"{record.category.__name__}: {_first_line(Warning(str(record.message)))}")


class _LogRecords(logging.Handler):
    """Collects what the ``transformers`` logger says (warning and up) instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(_cut(f"transformers logged: {_first_line(Warning(record.getMessage()))}"))


@contextlib.contextmanager
def _captured_transformers_logs() -> Iterator[_LogRecords]:
    """Route the ``transformers`` logger to a collector (its own handlers are put back after)."""
    logger = logging.getLogger("transformers")
    handlers, propagate = logger.handlers[:], logger.propagate
    collector = _LogRecords()
    logger.handlers[:] = [collector]
    logger.propagate = False
    try:
        yield collector
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate


# --- the check -------------------------------------------------------------------------------
def run_check(
    families: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
    progress: Callable[[CellResult], None] | None = None,
) -> CheckReport:
    """Check ``methods`` (default: all) on tiny models of ``families`` (default: every supported one).

    Runs single-threaded (``torch.set_num_threads(1)``, restored after): tiny models are fastest so.

    Args:
        families: model types, each in :func:`prefix_hooks.supported`, with all their variants
            (``prefix_hooks._tiny_models.VARIANTS``), or one variant as ``family:variant``; a
            supported type without a tiny model gives an ``error`` cell.
        methods: among :data:`METHODS`.
        tolerance: the absolute error ``cache`` and ``generate`` may reach.
        progress: called with each cell's result as soon as it is known.

    Returns:
        the report, one :class:`CellResult` per (family or variant, method).

    Raises:
        ValueError: an unknown family, variant or method.
    """
    rows = _rows(families)
    methods = list(methods) if methods is not None else list(METHODS)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {', '.join(unknown)}; accepted: {', '.join(METHODS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    cells = []
    try:
        for family, variant in rows:
            for method in methods:
                cell_start = time.perf_counter()
                with warnings.catch_warnings(record=True) as records, _captured_transformers_logs() as logs:
                    warnings.simplefilter("always")
                    if family in _tiny_models.FAMILIES:
                        cell = _check_cell(family, variant, method, tolerance)
                    else:
                        cell = CellResult(family, method, status="error", message="no tiny model in this check")
                said = [_warning_text(record) for record in records] + logs.messages
                cell.warnings = list(dict.fromkeys(said))
                cell.seconds = time.perf_counter() - cell_start
                cells.append(cell)
                if progress is not None:
                    progress(cell)
    finally:
        torch.set_num_threads(threads)
    return CheckReport(cells, tolerance, versions(), time.perf_counter() - start)


def _rows(names: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(family, variant)`` rows for ``names`` (default: every supported family, in the tiny
    models' order, which is the README's), each family followed by its variants.

    Raises:
        ValueError: a name that is no supported family, or no variant of one.
    """
    if names is None:
        known = [family for family in _tiny_models.FAMILIES if family in supported()]
        names = known + [family for family in supported() if family not in known]
    rows: list[tuple[str, str]] = []
    for name in names:
        family, _, variant = name.partition(":")
        if family not in supported():
            raise ValueError(f"unknown family {family!r}; supported: {', '.join(supported())}")
        variants = tuple(_tiny_models.VARIANTS.get(family, {}))
        if variant and variant not in variants:
            raise ValueError(f"unknown variant {name!r}; {family} has {', '.join(variants) or 'none'}")
        rows += [(family, variant)] if variant else [(family, ""), *((family, each) for each in variants)]
    return list(dict.fromkeys(rows))


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0: every cell passed or was refused by design)."""
    parser = argparse.ArgumentParser(
        prog="python -m prefix_hooks.check",
        description="Attach every method to a tiny model of every supported family and check that the adapter "
        "changes the output, cached decoding equals uncached, and detach restores the model bit-exactly.",
    )
    parser.add_argument(
        "--families", type=_names,
        help=f"comma-separated model types, each with its variants, or one variant as family:variant (default: "
        f"all {len(supported())} supported)",
    )
    parser.add_argument("--methods", type=_names, help=f"comma-separated, among {','.join(METHODS)} (default: all)")
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help=f"absolute, float32 (default {TOLERANCE:.0e})"
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress while checking")
    args = parser.parse_args(argv)
    try:
        _rows(args.families)
    except ValueError as error:
        parser.error(str(error))
    unknown = [method for method in args.methods or () if method not in METHODS]
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; accepted: {', '.join(METHODS)}")

    print("prefix_hooks self-check: " + ", ".join(f"{name} {version}" for name, version in versions().items()))
    print(
        f"invariants: the adapter changes the output (> {MIN_EFFECT:.0e}); detach restores outputs and state_dict "
        f"bit-exactly; on families that decode, incremental forward == full forward and cached == uncached "
        f"generate() (within {args.tolerance:.0e}). Cells: the worst error, FAIL <error> (<invariant>), ERROR, or "
        "refused (by design)."
    )
    sys.stdout.flush()

    def progress(cell: CellResult) -> None:
        if not args.quiet:
            print(f"  {cell.method:<8} x {cell.row:<18} {cell.text()[:60]}", file=sys.stderr, flush=True)

    report = run_check(args.families, args.methods, args.tolerance, progress=progress)
    print()
    print(report.table())
    details = report.details()
    if details:
        print()
        print(details)
    print()
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
