"""The attach/detach lifecycle: detach leaves no trace, decorator forms, ``disabled()``,
isolation between models and threads, atomic attach, PEFT's parameter report."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any

import peft
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from restoration import (
    BSZ,
    CUSTOM_ATTENTION,
    ERRORS_EVERYWHERE,
    HOOK_DICTS,
    IMPLEMENTATIONS,
    LIFECYCLE_FAMILIES,
    MANUAL_ACROSS_INTERRUPT,
    NESTED_REATTACH,
    NUM_VIRTUAL_TOKENS,
    PROGRAMS,
    SEQ_LEN,
    THREAD_BATCHES,
    THREAD_ITERATIONS,
    THREAD_SWITCH_INTERVAL,
    ProgramRun,
    assert_untouched,
    detach_everything,
    differences,
    logits,
    prefix_config,
    snapshot,
)
from tiny_models import VOCAB, build_model, random_batch
from torch import nn
from transformers import AlbertConfig, AlbertModel, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefix_hooks import Attachment, PrefixTuningConfig, UnsupportedModelError, attach_prefix, attachments_of, supported
from prefix_hooks.core.attachment import UndoStack
from prefix_hooks.prefix import attachment as prefix_module
from prefix_hooks.prefix import interposer as attention_interposer
from prefix_hooks.prefix.splice import SUPPORTED_IMPLEMENTATIONS


def test_snapshot_covers_the_promised_state() -> None:
    model = build_model("llama")
    parts = snapshot(model).parts
    module_dict = parts["modules"]["model.layers.0.self_attn"]["dict"]
    assert set(HOOK_DICTS) <= set(module_dict)
    assert "get_interface" not in parts["registries"]["ALL_ATTENTION_FUNCTIONS"]["vars"]
    assert "_global_forward_hooks" in parts["global_module_hooks"]


def test_snapshot_sees_each_kind_of_trace() -> None:
    """The comparison itself can fail: every kind of mutation detach must undo is reported."""
    model = build_model("llama")
    attention = model.model.layers[0].self_attn
    weight = attention.q_proj.weight
    mutations: dict[str, Callable[[], Any]] = {
        "hook": lambda: attention.register_forward_pre_hook(lambda *a: None),
        "kwargs hook": lambda: attention.register_forward_hook(lambda *a, **k: None, with_kwargs=True),
        "backward hook": lambda: attention.register_full_backward_pre_hook(lambda *a: None),
        "instance attribute": lambda: setattr(attention, "forward", attention.forward),
        "class": lambda: setattr(attention, "__class__", type("Sub", (type(attention),), {})),
        "child": lambda: model.add_module("extra", nn.Linear(1, 1)),
        "requires_grad": lambda: weight.requires_grad_(False),
        "parameter identity": lambda: setattr(attention.q_proj, "weight", nn.Parameter(weight.detach().clone())),
        "bits": lambda: weight.data.view(-1)[0].copy_(-weight.data.view(-1)[0]),
        "config": lambda: setattr(model.config, "use_cache", not model.config.use_cache),
        "registry": lambda: setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None),
        "registry mapping": lambda: ALL_ATTENTION_FUNCTIONS.__setitem__("custom", lambda *a: None),
    }
    for name, mutate in mutations.items():
        model = build_model("llama")
        attention = model.model.layers[0].self_attn
        weight = attention.q_proj.weight
        before = snapshot(model)
        mutate()
        try:
            assert differences(before, snapshot(model)), f"the snapshot missed a {name} change"
        finally:
            vars(ALL_ATTENTION_FUNCTIONS).pop("get_interface", None)
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop("custom", None)



@pytest.mark.parametrize("family", LIFECYCLE_FAMILIES)
@given(
    program=PROGRAMS,
    attn=st.sampled_from(IMPLEMENTATIONS),
    frozen_mask=st.integers(0, 255),
    position_offset=st.sampled_from([None, 0]),
    prefix_projection=st.booleans(),
)
@example(program=NESTED_REATTACH, attn="sdpa", frozen_mask=0b1010, position_offset=None, prefix_projection=False)
@example(program=MANUAL_ACROSS_INTERRUPT, attn="eager", frozen_mask=0b0001, position_offset=0, prefix_projection=True)
@example(program=ERRORS_EVERYWHERE, attn="sdpa", frozen_mask=0b1111_1110, position_offset=None, prefix_projection=True)
def test_detach_leaves_no_trace(
    make_warm_model: Callable[..., PreTrainedModel],
    family: str,
    program: list[Any],
    attn: str,
    frozen_mask: int,
    position_offset: int | None,
    prefix_projection: bool,
) -> None:
    model = make_warm_model(family, attn, frozen_mask=frozen_mask)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config(position_offset=position_offset, prefix_projection=prefix_projection))
    assert_untouched(model, before)  # building the handle changes nothing
    try:
        run = ProgramRun(model, handle, before)
        run.run(program)
        run.finish()
    finally:
        detach_everything(model)


def test_nested_blocks_restore_the_previous_state(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    base = logits(model, batch)
    handle = attach_prefix(model, prefix_config())
    with handle:
        attached = snapshot(model)
        prefixed = logits(model, batch)
        with handle:
            with handle.disabled():
                with handle.disabled():
                    pass
                assert torch.equal(logits(model, batch), base)  # still disabled: the outer block
            assert torch.equal(logits(model, batch), prefixed)
        assert_untouched(model, attached)  # the inner exit only counted down
        assert torch.equal(logits(model, batch), prefixed)
    assert_untouched(model, before)


# --- 2. decorator forms ----------------------------------------------------------------------
def test_decorated_function_keeps_its_signature_and_encoder(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)

    def score(batch: dict[str, torch.Tensor], *, scale: float = 1.0) -> tuple[torch.Tensor, list[nn.Parameter]]:
        """Logits and the adapter parameters the model carries during the call."""
        adapter = [p for attachment in attachments_of(model) for p in attachment.parameters()]
        assert {id(p) for p in adapter} <= {id(p) for p in model.parameters()}
        return logits(model, batch) * scale, adapter

    decorated = attach_prefix(model, prefix_config())(score)
    assert inspect.signature(decorated) == inspect.signature(score)
    assert (decorated.__name__, decorated.__doc__) == (score.__name__, score.__doc__)
    assert_untouched(model, before)  # decorating attaches nothing

    first, first_parameters = decorated(batch)
    assert_untouched(model, before)
    second, second_parameters = decorated(batch, scale=1.0)
    assert_untouched(model, before)
    assert len(first_parameters) == 1
    assert [id(p) for p in first_parameters] == [id(p) for p in second_parameters]
    assert torch.equal(first, second)
    assert not torch.equal(first, logits(model, batch))


def test_decorated_method(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("gpt2")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config())
    with handle:
        expected = logits(model, batch)

    class Evaluator:
        def __init__(self, model: nn.Module) -> None:
            self.model = model

        def evaluate(self, batch: dict[str, torch.Tensor], repeat: int = 1) -> list[torch.Tensor]:
            assert attachments_of(self.model) == [handle]
            return [logits(self.model, batch) for _ in range(repeat)]

        decorated = handle(evaluate)

    evaluator = Evaluator(model)
    assert inspect.signature(Evaluator.decorated) == inspect.signature(Evaluator.evaluate)
    assert inspect.signature(evaluator.decorated) == inspect.signature(evaluator.evaluate)
    outputs = evaluator.decorated(batch, repeat=2)
    assert all(torch.equal(output, expected) for output in outputs)
    assert_untouched(model, before)


def test_decorated_generator_is_attached_while_iterating(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("opt")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config())
    with handle:
        expected = logits(model, batch)

    @handle
    def stream(steps: int) -> Generator[torch.Tensor, None, str]:
        for _ in range(steps):
            assert attachments_of(model) == [handle]
            yield logits(model, batch)
        return "done"

    assert inspect.isgeneratorfunction(stream)
    generator = stream(3)
    assert not handle.is_attached  # calling a generator function runs nothing
    for output in generator:
        assert handle.is_attached
        assert torch.equal(output, expected)
    assert_untouched(model, before)

    generator = stream(1)
    next(generator)
    with pytest.raises(StopIteration) as stop:
        next(generator)
    assert stop.value.value == "done"
    assert_untouched(model, before)

    generator = stream(3)
    next(generator)
    assert handle.is_attached
    generator.close()
    assert_untouched(model, before)

    first, second = stream(2), stream(2)  # interleaved: the attachment is counted
    next(first), next(second)
    first.close()
    assert attachments_of(model) == [handle]
    assert torch.equal(next(second), expected)
    second.close()
    assert_untouched(model, before)


def test_decorated_coroutine_and_async_generator(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config())
    with handle:
        expected = logits(model, batch)

    @handle
    async def infer(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        await asyncio.sleep(0)
        assert attachments_of(model) == [handle]
        return logits(model, batch)

    @handle
    async def stream(steps: int) -> Any:
        for _ in range(steps):
            await asyncio.sleep(0)
            yield logits(model, batch)

    async def consume(steps: int) -> list[torch.Tensor]:
        return [output async for output in stream(steps)]

    async def gathered() -> list[torch.Tensor]:
        return list(await asyncio.gather(infer(batch), infer(batch)))

    assert inspect.iscoroutinefunction(infer)
    assert torch.equal(asyncio.run(infer(batch)), expected)
    assert_untouched(model, before)
    assert all(torch.equal(output, expected) for output in asyncio.run(gathered()))
    assert_untouched(model, before)
    assert all(torch.equal(output, expected) for output in asyncio.run(consume(2)))
    assert_untouched(model, before)


def test_parameters_are_usable_before_the_first_attach(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config())
    (weight,) = handle.parameters()
    loaded = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        weight.copy_(loaded)
    optimizer = torch.optim.SGD(handle.parameters(), lr=0.5)

    @handle
    def train_step() -> torch.Tensor:
        output = model(**batch, labels=batch["input_ids"])
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return output.logits.detach()

    reference = attach_prefix(model, prefix_config())  # weights loaded after attaching instead
    with reference:
        with torch.no_grad():
            reference.encoder.embedding.weight.copy_(loaded)
        expected = logits(model, batch)
    assert not torch.equal(expected, logits(model, batch))

    # the call used the loaded weights (grad mode may take the other sdpa route: 1e-7 apart)
    torch.testing.assert_close(train_step(), expected, atol=1e-6, rtol=0)
    assert not torch.equal(weight.detach(), loaded)  # and the optimizer built before attach trained them
    with reference:
        with torch.no_grad():
            reference.encoder.embedding.weight.copy_(weight)
        expected_after_step = logits(model, batch)
    torch.testing.assert_close(train_step(), expected_after_step, atol=1e-6, rtol=0)
    assert_untouched(model, before)


# --- 3. disabled() ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", LIFECYCLE_FAMILIES)
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_disabled_gives_the_base_logits(
    make_warm_model: Callable[..., PreTrainedModel], family: str, attn: str
) -> None:
    model = make_warm_model(family, attn)
    batch = random_batch(BSZ, SEQ_LEN, left_pad=[0, 2])
    base = logits(model, batch)
    with attach_prefix(model, prefix_config()) as handle:
        with handle.disabled():
            assert torch.equal(logits(model, batch), base)
        assert not torch.equal(logits(model, batch), base)


def test_disabled_is_local_to_the_thread(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    """A ``disabled()`` block in one thread leaves the prefix on for another thread's forward."""
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    base = logits(model, batch)
    with attach_prefix(model, prefix_config()) as handle:
        prefixed = logits(model, batch)
        inside_disabled = threading.Event()
        other_done = threading.Event()
        seen: dict[str, torch.Tensor] = {}

        def disabled_thread() -> None:
            with handle.disabled():
                inside_disabled.set()
                other_done.wait(timeout=30)
                seen["disabled"] = logits(model, batch)

        def other_thread() -> None:
            inside_disabled.wait(timeout=30)
            seen["other"] = logits(model, batch)
            other_done.set()

        threads = [threading.Thread(target=disabled_thread), threading.Thread(target=other_thread)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert handle.is_enabled
    assert torch.equal(seen["disabled"], base)
    assert torch.equal(seen["other"], prefixed)
    assert not torch.equal(prefixed, base)


# --- 4. isolation -------------------------------------------------------------------------------
def test_two_models_attached_at_once_are_independent(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    models = {"llama_a": make_warm_model("llama", seed=0), "llama_b": make_warm_model("llama", seed=1),
              "gpt2": make_warm_model("gpt2")}
    batch = random_batch(BSZ, SEQ_LEN, left_pad=[0, 1])
    handles = {name: attach_prefix(model, prefix_config()) for name, model in models.items()}
    alone = {}
    for name, model in models.items():
        with handles[name]:
            alone[name] = logits(model, batch)
    befores = {name: snapshot(model) for name, model in models.items()}

    for handle in handles.values():
        handle.attach()
    for name, model in models.items():
        assert torch.equal(logits(model, batch), alone[name])
    handles["llama_a"].detach()  # different models: no order between them
    for name in ("llama_b", "gpt2"):
        assert torch.equal(logits(models[name], batch), alone[name])
    handles["gpt2"].detach()
    assert torch.equal(logits(models["llama_b"], batch), alone["llama_b"])
    handles["llama_b"].detach()
    for name, model in models.items():
        assert_untouched(model, befores[name])


def test_unattached_model_is_unaffected(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    attached, bystander = make_warm_model("llama"), make_warm_model("llama")  # same classes, same weights
    batch = random_batch(BSZ, SEQ_LEN, left_pad=[0, 2])
    base = logits(bystander, batch)
    with attach_prefix(attached, prefix_config()):
        assert not torch.equal(logits(attached, batch), base)
        assert torch.equal(logits(bystander, batch), base)
        with torch.enable_grad():
            bystander(**batch, labels=batch["input_ids"]).loss.backward()
        assert {n for n, p in bystander.named_parameters() if p.grad is not None} == {
            n for n, p in bystander.named_parameters() if p.requires_grad
        }
    assert torch.equal(logits(bystander, batch), base)


def test_threads_share_an_attached_model(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batches = {size: random_batch(size, **spec) for size, spec in THREAD_BATCHES.items()}
    base = {size: logits(model, batch) for size, batch in batches.items()}
    barrier = threading.Barrier(len(batches), timeout=60)
    results: dict[int, list[torch.Tensor]] = {size: [] for size in batches}
    errors: list[BaseException] = []

    def worker(size: int) -> None:
        try:
            for _ in range(THREAD_ITERATIONS):
                barrier.wait()
                results[size].append(logits(model, batches[size]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    switch_interval = sys.getswitchinterval()
    with attach_prefix(model, prefix_config()):
        expected = {size: logits(model, batch) for size, batch in batches.items()}
        threads = [threading.Thread(target=worker, args=(size,)) for size in batches]
        sys.setswitchinterval(THREAD_SWITCH_INTERVAL)
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(switch_interval)
    assert not errors, errors
    for size, outputs in results.items():
        assert not torch.equal(expected[size], base[size])
        assert len(outputs) == THREAD_ITERATIONS
        assert all(torch.equal(output, expected[size]) for output in outputs), f"batch size {size}"


# --- 5. atomic attach ---------------------------------------------------------------------------
def tiny_albert() -> AlbertModel:
    """A model of a family no adapter serves."""
    config = AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return AlbertModel(config).eval()


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"num_layers": 3}, ["num_layers=3", "2 attention layers", "set it to 2"]),
        ({"token_dim": 32}, ["token_dim=32", "16", "2 key/value heads"]),  # llama is GQA: kv width 2 x 8
        ({"num_attention_heads": 4}, ["num_attention_heads=4", "set it to 2"]),
        ({"num_transformer_submodules": 2}, ["num_transformer_submodules=2", "takes 1"]),
    ],
)
def test_config_disagreeing_with_the_model_is_refused(
    make_warm_model: Callable[..., PreTrainedModel], overrides: dict[str, int], fragments: list[str]
) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        attach_prefix(model, prefix_config(**overrides))
    assert all(fragment in str(error.value) for fragment in fragments), str(error.value)
    assert_untouched(model, before)


@pytest.mark.parametrize("num_virtual_tokens", [0, -3, 2.5, "4", True, None])
def test_bad_num_virtual_tokens_is_refused(num_virtual_tokens: object) -> None:
    with pytest.raises(ValueError) as error:
        PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens)  # type: ignore[arg-type]
    assert f"num_virtual_tokens={num_virtual_tokens!r}" in str(error.value)
    assert "positive int" in str(error.value)


def test_unsupported_model_is_refused() -> None:
    model = tiny_albert()
    assert "albert" not in supported()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as error:
        attach_prefix(model, prefix_config())
    message = str(error.value)
    assert "model_type='albert'" in message
    assert all(family in message for family in supported())
    assert_untouched(model, before)


def test_unsupported_variant_of_a_supported_family_is_refused() -> None:
    model = build_model("gpt2", "eager", reorder_and_upcast_attn=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=True") as error:
        attach_prefix(model, prefix_config())
    assert "attn_implementation='sdpa'" in str(error.value)
    assert_untouched(model, before)


def test_unsupported_attn_implementation_is_refused(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    handle = attach_prefix(model, prefix_config())  # built while sdpa
    assert CUSTOM_ATTENTION not in SUPPORTED_IMPLEMENTATIONS
    ALL_ATTENTION_FUNCTIONS[CUSTOM_ATTENTION] = ALL_ATTENTION_FUNCTIONS["sdpa"]  # a user's own kernel
    try:
        model.set_attn_implementation(CUSTOM_ATTENTION)
        before = snapshot(model)
        for attach in (lambda: attach_prefix(model, prefix_config()), handle.attach):
            with pytest.raises(ValueError) as error:
                attach()
            assert f"attn_implementation={CUSTOM_ATTENTION!r}" in str(error.value)
            assert "eager, sdpa" in str(error.value)
            assert_untouched(model, before)
        assert not handle.is_attached
    finally:
        del ALL_ATTENTION_FUNCTIONS[CUSTOM_ATTENTION]


@pytest.mark.parametrize("adapter_name", ["default", "second"])
def test_second_prefix_is_refused(make_warm_model: Callable[..., PreTrainedModel], adapter_name: str) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    with attach_prefix(model, prefix_config()) as first:
        prefixed = logits(model, batch)
        attached = snapshot(model)
        second = attach_prefix(model, prefix_config(num_virtual_tokens=5), adapter_name=adapter_name)
        with pytest.raises(RuntimeError) as error:
            second.attach()
        assert "already carries the prefix 'default'" in str(error.value)
        assert "num_virtual_tokens" in str(error.value)
        assert_untouched(model, attached)
        assert not second.is_attached and first.is_attached
        assert torch.equal(logits(model, batch), prefixed)


@pytest.mark.parametrize("adapter_name", ["", "two words", "1st", "a-b", 3, None])
def test_bad_adapter_name_is_refused(make_warm_model: Callable[..., PreTrainedModel], adapter_name: object) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        attach_prefix(model, prefix_config(), adapter_name=adapter_name)  # type: ignore[arg-type]
    assert f"adapter_name={adapter_name!r}" in str(error.value)
    assert "identifier" in str(error.value)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("config", "offending"),
    [
        ({"num_virtual_tokens": NUM_VIRTUAL_TOKENS}, "dict"),
        # PEFT's class has the same name as ours: only its module tells the user which one they passed
        (peft.PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS), "peft"),
    ],
)
def test_config_of_the_wrong_type_is_refused(
    make_warm_model: Callable[..., PreTrainedModel], config: object, offending: str
) -> None:
    model = make_warm_model("llama")
    before = snapshot(model)
    with pytest.raises(TypeError) as error:
        attach_prefix(model, config)  # type: ignore[arg-type]
    assert "config must be a prefix_hooks.PrefixTuningConfig" in str(error.value)
    assert offending in str(error.value), str(error.value)
    assert_untouched(model, before)


def _failing(error: type[BaseException]) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error("injected failure")

    return fail


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("target", ["interposer", "forward shadow"])
def test_failure_midway_through_install_leaves_the_model_untouched(
    make_warm_model: Callable[..., PreTrainedModel], monkeypatch: pytest.MonkeyPatch, target: str,
    error: type[BaseException],
) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    base = logits(model, batch)
    before = snapshot(model)
    handle = attach_prefix(model, prefix_config())
    if target == "interposer":  # after freezing and registering the encoder
        monkeypatch.setattr(attention_interposer, "acquire", _failing(error))
    else:  # after everything but the base model's forward shadow
        monkeypatch.setattr(prefix_module, "shadow_forward", _failing(error))
    with pytest.raises(error, match="injected failure"):
        handle.attach()
    monkeypatch.undo()
    assert not handle.is_attached
    assert_untouched(model, before)
    with handle:  # and the handle still works
        assert not torch.equal(logits(model, batch), base)
    assert_untouched(model, before)


class MarkerAttachment(Attachment):
    """A second kind of adapter: one forward hook on the model, nothing else."""

    def _check_can_attach(self) -> None:
        pass

    def _install(self, undo: UndoStack) -> None:
        hook = self.model.register_forward_hook(lambda module, args, output: None)
        undo.push(hook.remove)

    def adapter_modules(self) -> list[nn.Module]:
        return []


def test_detaching_out_of_order_raises_before_mutating(make_warm_model: Callable[..., PreTrainedModel]) -> None:
    model = make_warm_model("llama")
    batch = random_batch(BSZ, SEQ_LEN)
    before = snapshot(model)
    prefix = attach_prefix(model, prefix_config()).attach()
    prefixed = logits(model, batch)
    marker = MarkerAttachment(model, "marker").attach()
    both = snapshot(model)
    try:
        with pytest.raises(RuntimeError) as error:
            prefix.detach()
        assert "detach 'marker' first" in str(error.value)
        assert "reverse order" in str(error.value)
        assert_untouched(model, both)
        assert prefix.is_attached
        assert attachments_of(model) == [prefix, marker]
        assert torch.equal(logits(model, batch), prefixed)
    finally:
        marker.detach()
        prefix.detach()
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="adapter 'default' is not attached"):
        prefix.detach()
    assert_untouched(model, before)


# --- 6. PEFT's parameter report ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("prefix_projection", [False, True])
def test_print_trainable_parameters_matches_peft(
    capsys: pytest.CaptureFixture[str], family: str, prefix_projection: bool
) -> None:
    peft_model = peft.get_peft_model(
        build_model(family),
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=prefix_projection
        ),
    )
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    expected = capsys.readouterr().out
    assert expected.startswith("trainable params: ")

    handle = attach_prefix(build_model(family), prefix_config(prefix_projection=prefix_projection))
    handle.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    with handle:
        handle.print_trainable_parameters()
        assert capsys.readouterr().out == expected
