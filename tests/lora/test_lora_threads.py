"""``handle.disabled()`` is local to a thread (and an async task) for LoRA and for the
modules-to-save copies of every method, as a prefix's switch is.

Oracle: the same forward run alone, adapter on (``adapted``) and inside ``disabled()``
(``base``). One thread (or task) holds ``disabled()`` open for the whole exchange and runs
forwards while the other runs forwards with the adapter on: every output of each must equal
its own oracle exactly. A merged adapter cannot be left out of one thread's forward, so
merging and ``disabled()`` exclude each other with an error, never a silently wrong output.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from tiny_encoders import build_head, text_batch
from tiny_lora import randomise, run
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import (
    AdaLoraConfig,
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    adapter_rows,
    attach_adalora,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)

FORWARDS = 12  # forwards of the adapted side while the other side's disabled() block is open
TIMEOUT = 60.0

LORA_CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama-linear": (lambda: build_model("llama"), {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    "gpt2-conv1d": (lambda: build_model("gpt2"), {"target_modules": ["c_attn", "c_proj"], "modules_to_save": ["ln_f"]}),
    "llama-embedding": (lambda: build_model("llama"), {"target_modules": ["embed_tokens"]}),
}


def _inputs() -> dict[str, torch.Tensor]:
    return random_batch(2, 6, seed=1, left_pad=[0, 2])


def _lora_handle(case: str) -> tuple[nn.Module, Any]:
    """A fresh model of ``case`` and a LoRA adapter on it with random factors and copies."""
    build, fields = LORA_CASES[case]
    model = build()
    handle = attach_lora(model, LoraConfig(r=4, lora_alpha=8, **fields))
    randomise(handle)
    return model, handle


def _differ(first: torch.Tensor, second: torch.Tensor) -> None:
    assert (first - second).abs().max() > 1e-3, "the adapter must change the output, or equality proves nothing"


def run_in_two_threads(
    switched_off: Callable[[], torch.Tensor], switched_on: Callable[[], torch.Tensor], handle: Attachment
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A second thread runs ``switched_off`` inside ``handle.disabled()``, and keeps that block open
    until this thread has run ``switched_on`` ``FORWARDS`` times; returns both threads' outputs."""
    inside = threading.Event()
    finished = threading.Event()

    def disabled_side() -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        with handle.disabled():
            inside.set()
            while not finished.is_set() or len(outputs) < FORWARDS:
                outputs.append(switched_off())
        return outputs

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(disabled_side)
        try:
            assert inside.wait(TIMEOUT)
            enabled_outputs = [switched_on() for _ in range(FORWARDS)]
        finally:
            finished.set()
        disabled_outputs = future.result(TIMEOUT)
    return disabled_outputs, enabled_outputs


def run_in_two_tasks(
    switched_off: Callable[[], torch.Tensor], switched_on: Callable[[], torch.Tensor], handle: Attachment
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`run_in_two_threads` with two asyncio tasks of one thread, yielding after every forward."""

    async def both() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inside = asyncio.Event()
        finished = asyncio.Event()

        async def disabled_side() -> list[torch.Tensor]:
            outputs: list[torch.Tensor] = []
            with handle.disabled():
                inside.set()
                while not finished.is_set() or len(outputs) < FORWARDS:
                    outputs.append(switched_off())
                    await asyncio.sleep(0)
            return outputs

        async def enabled_side() -> list[torch.Tensor]:
            await inside.wait()
            outputs: list[torch.Tensor] = []
            for _ in range(FORWARDS):
                outputs.append(switched_on())
                await asyncio.sleep(0)
            finished.set()
            return outputs

        return await asyncio.wait_for(asyncio.gather(disabled_side(), enabled_side()), TIMEOUT)

    return asyncio.run(both())


RUNNERS = {"threads": run_in_two_threads, "asyncio": run_in_two_tasks}


def _assert_all_equal(outputs: list[torch.Tensor], expected: torch.Tensor, what: str) -> None:
    wrong = [i for i, output in enumerate(outputs) if not torch.equal(output, expected)]
    worst = max(((outputs[i] - expected).abs().max().item() for i in wrong), default=0.0)
    assert not wrong, f"{len(wrong)} of {len(outputs)} {what} outputs are wrong (worst {worst:.3g})"


# --- LoRA (Linear, Conv1D, Embedding; modules-to-save copies) ------------------------------------
@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_disabled_in_one_thread_leaves_the_other_adapted(case: str, runner: str) -> None:
    model, handle = _lora_handle(case)
    inputs = _inputs()
    with handle:
        adapted = run(model, inputs)
        with handle.disabled():
            base = run(model, inputs)
        _differ(adapted, base)
        disabled, enabled = RUNNERS[runner](lambda: run(model, inputs), lambda: run(model, inputs), handle)
        _assert_all_equal(enabled, adapted, "adapted")
        _assert_all_equal(disabled, base, "disabled")
        assert torch.equal(run(model, inputs), adapted)


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_one_of_two_adapters_disabled_in_one_thread(runner: str) -> None:
    """Adapter ``a`` off in one thread: that thread computes ``b`` alone, the other both; per-row
    selection inside the block still gives a row the adapter it names."""
    model = build_model("llama")
    inputs = _inputs()
    fields = LORA_CASES["llama-linear"][1]
    a = attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=fields["target_modules"]), "a")
    b = attach_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]), "b")
    randomise(a, 5)
    randomise(b, 6)
    with b:
        only_b = run(model, inputs)
    with a, b:
        both = run(model, inputs)
        with adapter_rows(model, ["a", "__base__"]):
            rows = run(model, inputs)
        _differ(both, only_b)

        def disabled_side() -> torch.Tensor:
            with adapter_rows(model, ["a", "__base__"]):
                assert torch.equal(run(model, inputs), rows)
            return run(model, inputs)

        disabled, enabled = RUNNERS[runner](disabled_side, lambda: run(model, inputs), a)
        _assert_all_equal(enabled, both, "both adapters")
        _assert_all_equal(disabled, only_b, "b only")


# --- merged: merging and disabled() exclude each other --------------------------------------------
def test_merge_is_refused_while_another_thread_is_inside_disabled() -> None:
    model, handle = _lora_handle("llama-linear")
    inputs = _inputs()
    with handle:
        adapted = run(model, inputs)
        inside, leave = threading.Event(), threading.Event()

        def hold_disabled() -> torch.Tensor:
            with handle.disabled():
                inside.set()
                assert leave.wait(TIMEOUT)
                return run(model, inputs)

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(hold_disabled)
            try:
                assert inside.wait(TIMEOUT)
                with pytest.raises(RuntimeError, match=r"inside disabled\(\) in 1 other thread"):
                    handle.merge()
                with pytest.raises(RuntimeError, match=r"inside disabled\(\) in 1 other thread"):
                    handle.bake()
                assert not handle.is_merged and handle.is_attached
            finally:
                leave.set()
            base = future.result(TIMEOUT)
        _differ(adapted, base)
        handle.merge()  # every block has ended
        torch.testing.assert_close(run(model, inputs), adapted, atol=1e-5, rtol=0)
        with pytest.raises(RuntimeError, match="merged into the base weights; unmerge"), handle.disabled():
            pass
        handle.unmerge()
        with handle.disabled(), pytest.raises(RuntimeError, match="disabled here"):
            handle.merge()


def _assert_a_task_keeping_the_switch_raises_after_a_merge(model: nn.Module, handle: Any, match: str) -> None:
    """A task created inside ``disabled()`` keeps the switch (its context is a copy); if the adapter is
    merged after the block, that task's forward raises instead of silently computing the adapter."""
    inputs = _inputs()

    async def scenario() -> None:
        go = asyncio.Event()

        async def late_forward() -> torch.Tensor:
            await go.wait()
            return run(model, inputs)

        with handle.disabled():
            task = asyncio.create_task(late_forward())
        handle.merge()
        go.set()
        with pytest.raises(RuntimeError, match=match):
            await task

    with handle:
        asyncio.run(scenario())


def test_a_task_keeping_the_switch_after_a_merge_raises() -> None:
    model, handle = _lora_handle("llama-linear")
    _assert_a_task_keeping_the_switch_raises_after_a_merge(
        model, handle, r"merged into the weight .* but disabled\(\) in this thread"
    )


# --- modules-to-save copies of every method ------------------------------------------------------
METHODS: dict[str, Callable[[nn.Module], Attachment]] = {
    "lora": lambda model: attach_lora(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "ia3": lambda model: attach_ia3(model, IA3Config(task_type="SEQ_CLS")),
    "prefix": lambda model: attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")),
    "prompt": lambda model: attach_prompt(model, PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")),
}


def _randomise_all(handle: Attachment, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_modules_to_save_switch_per_thread(method: str, runner: str) -> None:
    """The task head (a modules-to-save copy) of every method runs in one thread while the other
    thread, inside ``disabled()``, runs the original head."""
    model = build_head("bert", "sequence")
    inputs = text_batch("bert", batch=2, seed=1)
    handle = METHODS[method](model)
    _randomise_all(handle, seed=3)

    @torch.no_grad()
    def logits() -> torch.Tensor:
        return model(**inputs).logits

    with handle:
        adapted = logits()
        with handle.disabled():
            base = logits()
        _differ(adapted, base)
        disabled, enabled = RUNNERS[runner](logits, logits, handle)
    _assert_all_equal(enabled, adapted, "adapted")
    _assert_all_equal(disabled, base, "disabled")


def test_ia3_merge_is_refused_while_another_thread_is_inside_disabled() -> None:
    model = build_model("llama")
    inputs = _inputs()
    handle = attach_ia3(model, IA3Config())
    _randomise_all(handle, seed=3)
    inside, leave = threading.Event(), threading.Event()

    def hold_disabled() -> torch.Tensor:
        with handle.disabled():
            inside.set()
            assert leave.wait(TIMEOUT)
            return run(model, inputs)

    with handle, ThreadPoolExecutor(max_workers=1) as pool:
        with handle.disabled():
            base = run(model, inputs)
        future = pool.submit(hold_disabled)
        try:
            assert inside.wait(TIMEOUT)
            with pytest.raises(RuntimeError, match=r"inside disabled\(\) in 1 other thread"):
                handle.merge()
            assert not handle.is_merged
        finally:
            leave.set()
        assert torch.equal(future.result(TIMEOUT), base)


def test_an_ia3_task_keeping_the_switch_after_a_merge_raises() -> None:
    model = build_model("llama")
    handle = attach_ia3(model, IA3Config())
    _randomise_all(handle, seed=3)
    _assert_a_task_keeping_the_switch_raises_after_a_merge(
        model, handle, r"merged into this Linear's weight but its adapter is disabled\(\)"
    )


# --- the LoRA variants: DoRA and AdaLoRA share LoRA's layer forward and its per-thread switch -----
VARIANTS: dict[str, Callable[[nn.Module], Attachment]] = {
    "dora": lambda model: attach_lora(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    ),
    "adalora": lambda model: attach_adalora(
        model, AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    ),
}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_disabled_in_one_thread_leaves_the_other_adapted_for_lora_variants(variant: str, runner: str) -> None:
    model = build_model("llama")
    handle = VARIANTS[variant](model)
    randomise(handle)  # type: ignore[arg-type]  # a LoRA-family handle
    inputs = _inputs()
    with handle:
        adapted = run(model, inputs)
        with handle.disabled():
            base = run(model, inputs)
        _differ(adapted, base)
        disabled, enabled = RUNNERS[runner](lambda: run(model, inputs), lambda: run(model, inputs), handle)
        _assert_all_equal(enabled, adapted, "adapted")
        _assert_all_equal(disabled, base, "disabled")
