"""GPU check: the benchmark models in bf16 on CUDA, base vs prefix_hooks vs PEFT, side by side.

Usage (on a machine with CUDA)::

    python -m benchmarks.gpu [--repeats 7] [--methods "prefix P=20" ...] [--output BENCHMARKS_GPU_RUN.md]
    python -m benchmarks.gpu --device cpu --quick --repeats 1    # the same code paths on CPU, tiny models

Prints one markdown table of speed ratios (base time / contender time, so > 1 is faster):
forward 4x128, a training step 4x128 (AdamW on the adapter; the base backpropagates to its
input embeddings), greedy generation of 64 tokens after 32 and 1024, and 16 single-token decode
steps on a ``DynamicCache`` after 1024, for the llama and gpt2 benchmark models and a larger
llama (2048 wide, 16 layers) where the GPU is not launch-bound. Timings synchronize the device
around each call; rounds rotate the order and ratios are paired (see ``benchmarks/run.py``).
Exits with a message when the device is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import LlamaConfig

from benchmarks.decode import DecodeInputs, DecodeLoop, peft_decode_loop
from benchmarks.methods import METHODS
from benchmarks.models import PAD_TOKEN_ID, ModelSpec, build_model, model_specs, random_tokens
from benchmarks.scenarios import Ratio, training_step_factory

DTYPE = torch.bfloat16
DEFAULT_METHODS = ("prefix P=20", "prefix P=20 + projection")
Operation = Callable[[], object]
Make = Callable[[Any, list[torch.nn.Parameter]], Operation]
"""(model, its trainable parameters) -> one timed call."""


def larger_llama(quick: bool) -> ModelSpec:
    """A llama where the GPU is not launch-bound (2048 wide, 16 layers; tiny with ``quick``)."""
    sizes: dict[str, Any] = (
        {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512}
        if quick
        else {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 8, "vocab_size": 32000}
    )
    return ModelSpec("llama 2048×16", lambda: LlamaConfig(**sizes, max_position_embeddings=2048, pad_token_id=PAD_TOKEN_ID))


def _timed(device: torch.device, operation: Operation) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronize()
    start = time.perf_counter()
    operation()
    synchronize()
    return time.perf_counter() - start


def _scenarios(base: Any, device: torch.device, quick: bool) -> dict[str, Make]:
    """Scenario name -> (model, trainable parameters) -> one timed call; build our operations attached."""
    batch, length, new_tokens, contexts = (2, 16, 4, (8, 32)) if quick else (4, 128, 64, (32, 1024))
    tokens = random_tokens(base, batch, length, 1).to(device)  # (B, T)
    scenarios: dict[str, Make] = {}

    def forward(model: Any, trainable: list[torch.nn.Parameter]) -> Operation:
        @torch.no_grad()
        def run() -> object:
            return model(input_ids=tokens)

        return run

    scenarios[f"forward {batch}×{length}"] = forward
    scenarios[f"train step {batch}×{length}"] = training_step_factory(tokens)
    for context in contexts:
        prompt = random_tokens(base, 1, context, 1).to(device)  # (1, T)

        def generate(model: Any, trainable: list[torch.nn.Parameter], prompt: torch.Tensor = prompt) -> Operation:
            return lambda: model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID,
            )

        scenarios[f"generate {new_tokens} after {context}"] = generate
    steps = 4 if quick else 16
    inputs = DecodeInputs(random_tokens(base, 1, contexts[-1], 1).to(device), random_tokens(base, 1, steps, 2).to(device), False)

    def decode(model: Any, trainable: list[torch.nn.Parameter]) -> Operation:
        loop = peft_decode_loop(model, inputs) if hasattr(model, "peft_config") else DecodeLoop(model, model, inputs)
        return loop.run

    scenarios[f"decode {steps} after {contexts[-1]}"] = decode
    return scenarios


def run(specs: Sequence[ModelSpec], methods: Sequence[str], repeats: int, device: torch.device, quick: bool) -> list[str]:
    """The table's rows, printed as they come."""
    rows = []
    dtype = DTYPE if device.type == "cuda" else torch.float32
    for spec in specs:
        base = build_model(spec)
        torch.nn.Module.to(base, device, dtype)
        for name in methods:
            method = METHODS[name]
            handle = method.ours(base)
            peft_base = build_model(spec)
            torch.nn.Module.to(peft_base, device, dtype)
            peft_model = method.build_peft(peft_base, handle)
            peft_trainable = [p for p in peft_model.parameters() if p.requires_grad]
            for scenario, make in _scenarios(base, device, quick).items():
                training = scenario.startswith("train step")
                if training and not method.trains:
                    continue
                for model in (base, peft_model):
                    model.train(training)
                with handle:  # ours is built attached (a decode loop prefills here)
                    operations = {"ours": make(base, list(handle.parameters()))}
                operations["base"] = make(base, [])
                operations["peft"] = make(peft_model, peft_trainable)
                times: dict[str, list[float]] = {who: [] for who in operations}
                order = ("base", "ours", "peft")
                for round_index in range(repeats + 1):
                    for who in order[round_index % 3 :] + order[: round_index % 3]:
                        if who == "ours":
                            with handle:
                                seconds = _timed(device, operations[who])
                        else:
                            seconds = _timed(device, operations[who])
                        if round_index:  # round 0 warms up
                            times[who].append(seconds)
                for model in (base, peft_model):
                    model.eval()
                # time ratios inverted so that > 1 means faster
                ratios = (
                    Ratio.paired(times["base"], times["ours"]),
                    Ratio.paired(times["base"], times["peft"]),
                    Ratio.paired(times["peft"], times["ours"]),
                )
                cells = [f"{r.median:.3g} ({r.low:.3g}–{r.high:.3g})" for r in ratios]
                row = f"| {spec.name} | {scenario} (speed) | {name} | " + " | ".join(cells) + " |"
                print(row, flush=True)
                rows.append(row)
            del peft_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS), metavar="METHOD")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the same code")
    parser.add_argument("--quick", action="store_true", help="tiny models and short sequences")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device (or --device cpu for a dry run)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = [
        f"device: {name}, torch {torch.__version__}, dtype {DTYPE if device.type == 'cuda' else torch.float32}",
        "",
        "| model | scenario | method | ours/base | PEFT/base | ours/PEFT |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    specs = [*model_specs(quick=args.quick), larger_llama(args.quick)]
    rows = run(specs, args.methods, args.repeats, device, args.quick)
    if args.output is not None:
        args.output.write_text("\n".join(header + rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
