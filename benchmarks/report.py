"""The results file: machine, versions, date, methods of measurement, and the table."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers

import prefix_hooks
from benchmarks.measure import MEMORY_METHOD
from benchmarks.scenarios import Parity, Ratio, Row, Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (
    "model",
    "scenario",
    "method",
    "unit",
    "base",
    "prefix_hooks",
    "PEFT",
    "ours/base",
    "PEFT/base",
    "ours/PEFT",
)


@dataclass(frozen=True)
class Environment:
    """Where and with what the benchmarks ran."""

    cpu: str
    cores: int
    torch_threads: int
    python: str
    torch: str
    transformers: str
    peft: str
    prefix_hooks: str
    date: str
    load_average: float
    """The 1-minute load average when the run started."""

    @classmethod
    def current(cls) -> Environment:
        """The environment now: call it when the run starts (the date and load are of that moment)."""
        return cls(
            cpu=_cpu_model(),
            cores=os.cpu_count() or 0,
            torch_threads=torch.get_num_threads(),
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            peft=peft.__version__,
            prefix_hooks=_prefix_hooks_version(),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            load_average=load_average(),
        )


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _prefix_hooks_version() -> str:
    """The package version, plus the git commit (``+dirty`` with local changes) when run from a checkout."""
    version = prefix_hooks.__version__
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} ({commit})" if commit else version


def format_number(value: float | None) -> str:
    """Three significant digits (no exponent above 100); ``—`` for no value."""
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_ratio(ratio: Ratio | None) -> str:
    """``median (low–high)``: the paired ratio and its interquartile range; ``—`` for none."""
    if ratio is None:
        return "—"
    if ratio.low == ratio.high:
        return format_number(ratio.median)
    return f"{format_number(ratio.median)} ({format_number(ratio.low)}–{format_number(ratio.high)})"


def markdown_table(rows: list[Row]) -> str:
    """The results as a markdown table, one line per row."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = (
            row.model,
            row.scenario,
            row.method,
            row.unit,
            format_number(row.base),
            format_number(row.ours),
            format_number(row.peft),
            format_ratio(row.ours_base),
            format_ratio(row.peft_base),
            format_ratio(row.ours_peft),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_section(environment: Environment, load_at_end: float) -> str:
    """Date, machine, versions, and the machine's load around the run."""
    return "\n".join(
        [
            f"- Date: {environment.date}",
            f"- Machine: {environment.cpu}, {environment.cores} cores, torch threads: {environment.torch_threads}",
            (
                f"- Versions: python {environment.python}, torch {environment.torch}, "
                f"transformers {environment.transformers}, peft {environment.peft}, prefix_hooks {environment.prefix_hooks}"
            ),
            (
                f"- Load average (1 min) at start / end: {environment.load_average:.2f} / {load_at_end:.2f}; the run "
                f"itself accounts for up to {environment.torch_threads}, more means other work competed for the cores"
            ),
        ]
    )


def methodology(workload: Workload, method_names: list[str]) -> str:
    """How every number was obtained, as a markdown bullet list."""
    prompts = " and ".join(str(length) for length in workload.prompt_lens)
    return "\n".join(
        [
            (
                f"- Contenders, per model: the base model, prefix_hooks and PEFT for each method ({', '.join(method_names)}), "
                "on the same weights (every instance built from the same config and seed; PEFT's encoder loaded with our "
                "encoder's state dict; the logits are checked to agree, see Parity). Ours attaches to the base model's "
                "instance around each measured call (the attach itself is not timed); each PEFT model wraps a copy of its own."
            ),
            "- Models: sdpa attention, float32, eval mode except in the training step; base parameters frozen.",
            (
                "- LoRA: r=8, alpha=16, the family's default targets (PEFT's: q_proj/v_proj for llama, c_attn for gpt2), "
                "B drawn non-zero so that the adapter changes the logits; PEFT loads our factors by state-dict key. "
                "`merged` merges on every attach (`handle.merge()`, PEFT's `merge_adapter()`) and is not trained."
            ),
            (
                "- Prompt tuning and P-tuning (MLP head): 20 virtual tokens in front of the input; PEFT's `prompt_encoder` "
                "loads our module's state dict. PEFT returns logits for the virtual positions too; the parity check "
                "compares the real positions. IA3: the family's default targets (keys, values and the MLP's down "
                "projection), vectors drawn around 1 so that the adapter changes the logits; PEFT loads them by its "
                "checkpoint keys."
            ),
            (
                f"- LoRA on the meta skeleton: a llama of {workload.skeleton[0]} layers, {workload.skeleton[1]} wide, "
                "built on the meta device (no weights); ours is `attach_lora(model, LoraConfig(r=8, "
                "target_modules='all-linear'))` entered and left, PEFT's is `get_peft_model(...)` then `unload()`."
            ),
            (
                f"- Timing: `time.perf_counter`, {workload.warmup} warm-up run(s) of every contender, then "
                f"{workload.repeats} rounds (attach: {workload.attach_repeats}); each round runs every contender once, "
                "the starting contender rotating from round to round; medians are reported."
            ),
            f"- forward {workload.batch}×{workload.seq_len}: one forward under `torch.no_grad()`.",
            (
                f"- train step {workload.batch}×{workload.seq_len}: `zero_grad`, forward with `labels=input_ids`, backward, "
                "`torch.optim.AdamW` step on the adapter parameters only (train mode). The base model has no adapter: its "
                "step backpropagates to the input embeddings (the gradient work through every layer that any adapter "
                "needs), with no weight gradients and no optimizer step."
            ),
            "- " + MEMORY_METHOD,
            (
                f"- generate {workload.new_tokens} after {prompts}: greedy `generate()` with "
                f"`min_new_tokens=max_new_tokens={workload.new_tokens}, do_sample=False`, batch 1; tokens/s = new tokens "
                "over the wall time of the whole call, prefill included."
            ),
            (
                f"- decode {workload.decode_steps} after {' and '.join(map(str, workload.decode_contexts))}: the loop a "
                "streaming server writes (`benchmarks/decode.py`): a `DynamicCache` prefilled with the prompt (not timed), "
                f"then {workload.decode_steps} single-token `model(input_ids=token, <cache>=cache, use_cache=True)` calls, "
                "batch 1, under `torch.no_grad()`; the cache is cropped back after each round. `positions + mask` also "
                "passes `position_ids` and an all-ones `attention_mask` on each step. tokens/s = steps over their wall "
                "time. PEFT's prompt-learning models prefill through the PEFT model and step through the base model it "
                "wraps (their own forward would put the virtual tokens in front again); ours decodes with the handle "
                "attached and is checked against an uncached forward first."
            ),
            (
                "- attach + detach: ours is `handle.attach(); handle.detach()` on a built handle; build + attach + detach "
                "also builds the handle (`attach_prefix(...)`: config resolution, encoder initialisation). PEFT's "
                "equivalent in both rows is `peft.get_peft_model(model, config)` (which builds the encoder) followed by "
                "PEFT's way back, `get_base_model()` (prompt-learning methods have no `unload()`), and restoring the "
                "`requires_grad` flags PEFT cleared."
            ),
            (
                "- Ratios are paired: each round gives one ratio of two contenders measured minutes apart at most "
                "(seconds, mostly), and the table shows the median of those per-round ratios with their interquartile "
                "range in brackets. Pairing cancels the slow drift of machine load that a ratio of two medians keeps; "
                "the bracket is how far the median can be trusted. For ms and MiB lower is better, for tokens/s higher "
                "is better. The memory is measured once, so it has no bracket."
            ),
        ]
    )


def parity_section(checks: dict[tuple[str, str], Parity]) -> str:
    lines = [
        f"- {model} / {method}: max |logits(prefix_hooks) − logits(PEFT)| = {check.gap:.2g}; "
        f"the prefix moves the logits by up to {check.effect:.2g} (max |prefix_hooks − base|)"
        for (model, method), check in checks.items()
    ]
    return "\n".join(["Forward batch, eval mode, before any training step:", *lines])
