"""Operator counts: the work each contender dispatches, independent of machine noise.

Timings on a shared machine move by several percent from run to run (see the A/A rows of
``BENCHMARKS.md``); the number of aten operators a call dispatches does not. This counts
them for the base model, prefix_hooks and PEFT on the same weights and reports, per method,
how many operators each adds to the base model, and which operators ours dispatches that
PEFT's does not.

Usage::

    python -m benchmarks.opcount                 # the benchmark models, markdown table on stdout
    python -m benchmarks.opcount --quick         # tiny models (seconds)
    python -m benchmarks.opcount --output OPCOUNT.md
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.decode import DecodeInputs, DecodeLoop, peft_decode_loop
from benchmarks.methods import METHODS, Method
from benchmarks.models import PAD_TOKEN_ID, ModelSpec, build_model, model_specs, random_tokens
from benchmarks.scenarios import CausalLM, training_step_factory

BATCH, SEQ_LEN, NEW_TOKENS = 2, 16, 8
DECODE = "decode step"
DECODE_EXPLICIT = "decode step, positions + mask"
SCENARIOS = ("forward", "train step", f"generate {NEW_TOKENS}", DECODE, DECODE_EXPLICIT)


@dataclass(frozen=True)
class Count:
    """Operator counts of one scenario and method.

    Attributes:
        base, ours, peft: aten operators dispatched by one call (every level of nesting); the
            train step is the timed benchmark's (AdamW on the adapter; the base backpropagates
            to its input embeddings).
        ours_only: operators ours dispatches more often than PEFT's, with the excess.
    """

    model: str
    scenario: str
    method: str
    base: int
    ours: int
    peft: int
    ours_only: dict[str, int]


def aten_ops(operation: Callable[[], object]) -> collections.Counter[str]:
    """Names of the aten operators one run of ``operation`` dispatches, with their counts."""
    operation()  # warm: lazy initialisation is not part of the steady state
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        operation()
    return collections.Counter(event.name for event in profiler.events() if event.name.startswith("aten::"))


def _operation(
    scenario: str, model: CausalLM, input_ids: torch.Tensor, trainable: list[torch.nn.Parameter]
) -> Callable[[], object]:
    """One call of ``scenario`` on ``model``; build it with any adapter of ours attached (a decode
    step prefills here)."""
    if scenario in (DECODE, DECODE_EXPLICIT):  # one single-token forward on a user cache, after one such step
        prompt, tokens = input_ids[:1, :-2], input_ids[1:, -2:]  # (1, T - 2), (1, 2): the warm-up step and the counted one
        inputs = DecodeInputs(prompt, tokens, explicit=scenario == DECODE_EXPLICIT)
        loop = peft_decode_loop(model, inputs) if isinstance(model, peft.PeftModel) else DecodeLoop(model, model, inputs)
        return loop.next_step
    if scenario == "forward":

        @torch.no_grad()
        def forward() -> object:
            return model(input_ids=input_ids)

        return forward
    if scenario == "train step":  # the benchmark's step: AdamW on the adapter, or backprop to the inputs
        return training_step_factory(input_ids)(model, trainable)

    def generate() -> object:
        return model.generate(  # type: ignore[operator]
            input_ids=input_ids[:1], attention_mask=torch.ones_like(input_ids[:1]), do_sample=False,
            min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, pad_token_id=PAD_TOKEN_ID,
        )

    return generate


def count_model(spec: ModelSpec, methods: dict[str, Method]) -> list[Count]:
    """Counts for every scenario and method on one model."""
    base = build_model(spec)
    input_ids = random_tokens(base, BATCH, SEQ_LEN, seed=1)  # (B, T)
    counts: list[Count] = []
    for name, method in methods.items():
        handle = method.ours(base)
        peft_model = method.build_peft(build_model(spec), handle)
        for scenario in SCENARIOS:
            if scenario == "train step" and not method.trains:
                continue
            train = scenario == "train step"
            for model in (base, peft_model):
                model.train(train)
            peft_trainable = [p for p in peft_model.parameters() if p.requires_grad]
            base_ops = aten_ops(_operation(scenario, base, input_ids, []))
            with handle:  # a decode step continues a cache filled in the same attach
                ours_ops = aten_ops(_operation(scenario, base, input_ids, list(handle.parameters())))
            peft_ops = aten_ops(_operation(scenario, peft_model, input_ids, peft_trainable))
            excess = {op: ours_ops[op] - peft_ops[op] for op in ours_ops if ours_ops[op] > peft_ops[op]}
            counts.append(
                Count(spec.name, scenario, name, sum(base_ops.values()), sum(ours_ops.values()),
                      sum(peft_ops.values()), dict(sorted(excess.items())))
            )
        base.eval()
    return counts


def markdown(counts: list[Count]) -> str:
    lines = [
        "| model | scenario | method | base | prefix_hooks | PEFT | ours − base | PEFT − base | ours only (count) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in counts:
        extra = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in c.ours_only.items()) or "—"
        lines.append(
            f"| {c.model} | {c.scenario} | {c.method} | {c.base} | {c.ours} | {c.peft} | {c.ours - c.base:+d} | "
            f"{c.peft - c.base:+d} | {extra} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Count]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.opcount", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models with the same structure")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD", help="only these methods")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    methods = {name: method for name, method in METHODS.items() if args.methods is None or name in args.methods}
    counts = [count for spec in model_specs(args.quick) for count in count_model(spec, methods)]
    table = markdown(counts)
    print(table)
    if args.output is not None:
        args.output.write_text(
            f"# Operator counts (batch {BATCH} × {SEQ_LEN} tokens; generate: 1 × {SEQ_LEN} + {NEW_TOKENS}; "
            f"decode step: the second single-token step after 1 × {SEQ_LEN - 2} in a DynamicCache)\n\n"
            f"Command: `python -m benchmarks.opcount {' '.join(argv or sys.argv[1:])}`\n\n{table}\n"
        )
    return counts


if __name__ == "__main__":
    main()
