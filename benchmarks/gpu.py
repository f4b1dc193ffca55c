"""GPU check: the benchmark models in bf16 on CUDA, base vs prefix_hooks vs PEFT, side by side.

Usage (on a machine with CUDA)::

    python -m benchmarks.gpu [--repeats 7]

Prints one markdown table: forward 4x128 and greedy generation of 64 tokens after 32 and
1024, for every registered method, as paired ratios (see ``benchmarks/run.py``). Timings
synchronize the device around each call. Exits with a message when CUDA is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.methods import METHODS
from benchmarks.models import PAD_TOKEN_ID, build_model, model_specs, random_tokens
from benchmarks.scenarios import Ratio

DTYPE = torch.bfloat16


def _timed(operation: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    operation()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {DTYPE}")
    print("| model | scenario | method | ours/base | PEFT/base | ours/PEFT |")
    print("|---|---|---|---|---|---|")
    for spec in model_specs(quick=False):
        base = build_model(spec)
        torch.nn.Module.to(base, "cuda", DTYPE)
        for name, method in METHODS.items():
            handle = method.ours(base)
            peft_base = build_model(spec)
            torch.nn.Module.to(peft_base, "cuda", DTYPE)
            peft_model = method.build_peft(peft_base, handle)
            scenarios: dict[str, Callable[[torch.nn.Module], Callable[[], object]]] = {}
            tokens = random_tokens(base, 4, 128, 1).cuda()  # (4, 128)
            scenarios["forward 4×128"] = lambda model: (lambda: model(input_ids=tokens))
            for prompt_len in (32, 1024):
                prompt = random_tokens(base, 1, prompt_len, 1).cuda()  # (1, T)

                def generate(model: torch.nn.Module, prompt: torch.Tensor = prompt) -> Callable[[], object]:
                    return lambda: model.generate(  # type: ignore[operator]
                        input_ids=prompt,
                        attention_mask=torch.ones_like(prompt),
                        do_sample=False,
                        min_new_tokens=64,
                        max_new_tokens=64,
                        pad_token_id=PAD_TOKEN_ID,
                    )

                scenarios[f"generate 64 after {prompt_len}"] = generate
            for scenario, make in scenarios.items():
                times: dict[str, list[float]] = {"base": [], "ours": [], "peft": []}
                with torch.no_grad():
                    for round_index in range(args.repeats + 1):
                        for who in ("base", "ours", "peft")[round_index % 3 :] + ("base", "ours", "peft")[: round_index % 3]:
                            if who == "ours":
                                with handle:
                                    seconds = _timed(make(base))
                            else:
                                seconds = _timed(make(base if who == "base" else peft_model))
                            if round_index:  # round 0 warms up
                                times[who].append(seconds)
                # time ratios inverted so that > 1 means faster, as tokens/s
                ours_base = Ratio.paired(times["base"], times["ours"])
                peft_vs_base = Ratio.paired(times["base"], times["peft"])
                ours_peft = Ratio.paired(times["peft"], times["ours"])
                cells = [f"{r.median:.3g} ({r.low:.3g}–{r.high:.3g})" for r in (ours_base, peft_vs_base, ours_peft)]
                print(f"| {spec.name} | {scenario} (speed) | {name} | " + " | ".join(cells) + " |", flush=True)
            del peft_model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
