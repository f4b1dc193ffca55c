"""Run every benchmark scenario and print (optionally write) the results as markdown.

Usage, from the repository root::

    python -m benchmarks.run                          # full run, about 5 minutes on 2 idle cores
    python -m benchmarks.run --quick                  # smoke run: tiny models, under a minute
    python -m benchmarks.run --output BENCHMARKS.md   # also write the results file
    python -m benchmarks.run --scenarios generate --repeats 15   # only some scenarios, more rounds
    python -m benchmarks.run --methods ia3 "prompt tuning P=20"  # only some methods
    python -m benchmarks.run --scenarios decode --models llama     # the hand-written decode loop
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.decode import decode_rows
from benchmarks.methods import METHODS, Method
from benchmarks.models import ModelSpec, build_model, model_specs
from benchmarks.report import (
    Environment,
    environment_section,
    load_average,
    markdown_table,
    methodology,
    parity_section,
)
from benchmarks.scenarios import (
    Contenders,
    Parity,
    Row,
    Workload,
    attach_detach,
    forward_latency,
    generation,
    lora_on_meta_skeleton,
    parity,
    training_step,
)

FULL = Workload(batch=4, seq_len=128, prompt_lens=(32, 1024), new_tokens=64, repeats=5, warmup=1, attach_repeats=50)
SCENARIOS = ("attach", "forward", "train", "generate", "decode")
QUICK = Workload(
    batch=2, seq_len=16, prompt_lens=(8, 32), new_tokens=4, repeats=2, warmup=1, attach_repeats=5, skeleton=(2, 128),
    decode_contexts=(8,), decode_steps=2,
)


@dataclass(frozen=True)
class Report:
    """What one run produced: the rows, the parity checks, the markdown text and the run time."""

    rows: list[Row]
    parity: dict[tuple[str, str], Parity]
    markdown: str
    seconds: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and short sequences, same code paths")
    parser.add_argument("--output", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--repeats", type=int, help=f"timed rounds per scenario (default: {FULL.repeats}, --quick: {QUICK.repeats})"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[spec.name for spec in model_specs(quick=False)],
        help="only these models (default: all)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        metavar="METHOD",
        help=f"only these methods (default: all): {', '.join(repr(name) for name in METHODS)}",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        help="only these scenarios (default: all; 'train' includes its peak memory; 'decode' is the hand-written "
        "loop of single-token forwards with a user cache)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats}; expected at least 1")
    if args.threads < 1:
        parser.error(f"--threads={args.threads}; expected at least 1")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark_model(
    spec: ModelSpec, methods: dict[str, Method], workload: Workload, scenarios: Sequence[str] = SCENARIOS
) -> tuple[list[Row], dict[str, Parity]]:
    """The ``scenarios`` (names from :data:`SCENARIOS`) on one model.

    Returns:
        the rows, and the parity check (ours vs PEFT and vs the base) per method.
    """
    start = time.perf_counter()

    def done(what: str) -> None:
        _log(f"  {spec.name}: {what} done at {time.perf_counter() - start:.0f}s")

    base = build_model(spec)
    handles = {name: method.ours(base) for name, method in methods.items()}
    peft_bases = {name: build_model(spec) for name in methods}  # get_peft_model mutates: one copy each
    attach_rows: list[Row] = []
    if "attach" in scenarios:
        attach_rows = attach_detach(spec.name, base, handles, peft_bases, methods, workload)
        done("attach + detach")
    peft_models = {name: method.build_peft(peft_bases[name], handles[name]) for name, method in methods.items()}
    contenders = Contenders(spec.name, base, handles, peft_models)
    checks = parity(contenders, workload)
    rows: list[Row] = []
    if "forward" in scenarios:
        rows += forward_latency(contenders, workload)
        done("forward")
    if "train" in scenarios:
        trained = [name for name, method in methods.items() if method.trains]
        rows += training_step(contenders.only(trained), workload)
        done("training step")
    if "generate" in scenarios:
        for prompt_len in workload.prompt_lens:
            rows += generation(contenders, workload, prompt_len)
            done(f"generation after {prompt_len}")
    if "decode" in scenarios:
        for context_len in workload.decode_contexts:
            for explicit in (False, True):
                rows += decode_rows(contenders, workload, context_len, explicit)
            done(f"decode loop after {context_len}")
    return rows + attach_rows, checks


def render(
    environment: Environment,
    rows: list[Row],
    checks: dict[tuple[str, str], Parity],
    workload: Workload,
    argv: Sequence[str],
    seconds: float,
) -> str:
    """The whole markdown report."""
    command = " ".join(["python -m benchmarks.run", *argv])
    return (
        "\n\n".join(
            [
                "# Benchmarks: prefix_hooks against the base model and PEFT",
                environment_section(environment, load_at_end=load_average())
                + f"\n- Command: `{command}` ({seconds:.0f} s)",
                "## Results",
                markdown_table(rows),
                "## How it was measured",
                methodology(workload, list(dict.fromkeys(method for _model, method in checks)) or list(METHODS)),
                "## Parity (same weights, same function)",
                parity_section(checks),
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmarks as the command line ``argv`` says; print the report and return it.

    The torch thread count is restored on return.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    workload = QUICK if args.quick else FULL
    if args.repeats is not None:
        workload = dataclasses.replace(workload, repeats=args.repeats)
    specs = [spec for spec in model_specs(args.quick) if args.models is None or spec.name in args.models]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        environment = Environment.current()
        start = time.perf_counter()
        rows: list[Row] = []
        checks: dict[tuple[str, str], Parity] = {}
        for spec in specs:
            methods = {name: method for name, method in METHODS.items() if args.methods is None or name in args.methods}
            model_rows, model_checks = benchmark_model(spec, methods, workload, args.scenarios or SCENARIOS)
            rows += model_rows
            checks.update({(spec.name, method): check for method, check in model_checks.items()})
        if args.scenarios is None or "attach" in args.scenarios:
            rows += lora_on_meta_skeleton(workload)
            _log("  LoRA on the meta skeleton done")
        seconds = time.perf_counter() - start
        markdown = render(environment, rows, checks, workload, argv, seconds)
    finally:
        torch.set_num_threads(previous_threads)

    print(markdown)
    if args.output is not None:
        args.output.write_text(markdown)
    return Report(rows, checks, markdown, seconds)


if __name__ == "__main__":
    main()
