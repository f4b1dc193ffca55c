"""Prefix-tuning checkpoints: our folders and PEFT's, both ways, with PEFT as the oracle.

* ours -> ours: the folded prefix, the trainable form and the logits come back bit for bit;
* PEFT ``save_pretrained`` -> ``load_adapter``: PEFT's logits (1e-5);
* ``save_adapter`` -> ``PeftModel.from_pretrained``: our logits (1e-5);
* the ``"full"`` encoder-decoder layout round trips in ours and is refused by PEFT;
* resuming training (projection MLP restored from the extra file) continues the loss curve;
* each bad checkpoint raises a clear error and leaves the model as it was.

Cases: llama (grouped-query attention), gpt2, bert sequence classification (its classifier
is trained as a modules_to_save copy, as in PEFT's task model), t5 in PEFT's layout. PEFT runs
through ``bridge_peft_cache_keyword``: on transformers 5.24+ it would refuse BERT's classifier
(and warn on Llama) only because it spells the cache ``past_key_values``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import tiny_encoders
import tiny_seq2seq
import torch
from restoration import assert_untouched, snapshot, warm_up
from safetensors.torch import load_file, save_file
from shared_fixtures import bridge_peft_cache_keyword
from tiny_models import build_model, random_batch
from torch import nn
from transformers import PreTrainedModel

from prefix_hooks import Attachment, PrefixAttachment, PrefixTuningConfig, attach, attach_prefix
from prefix_hooks.checkpoint import load_adapter
from prefix_hooks.checkpoint.codecs.prefix import FULL_LAYOUT_KEY

P = 3
ATOL = 1e-5
MIN_EFFECT = 1e-2  # the adapter must move the logits by more than this, or a comparison proves nothing
WEIGHTS = "adapter_model.safetensors"
EXTRA = "prefix_hooks_extra.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Case:
    """A model, its inputs, and the prefix config fields it is tested with (ours and PEFT's)."""

    build: Callable[[], PreTrainedModel]
    inputs: Callable[[], dict[str, torch.Tensor]]
    task_type: str
    ours_only: dict[str, Any] = field(default_factory=dict)  # fields PEFT's config lacks
    real: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # mask of compared logits rows


def _causal_real(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs["attention_mask"].bool()  # (B, T): logits at padding positions are not compared


CASES: dict[str, Case] = {
    "llama-gqa": Case(
        lambda: build_model("llama"),
        lambda: random_batch(2, 5, seed=1, left_pad=[0, 2]),
        "CAUSAL_LM",
        real=_causal_real,
    ),
    "gpt2": Case(
        lambda: build_model("gpt2"), lambda: random_batch(2, 5, seed=1, left_pad=[0, 2]), "CAUSAL_LM", real=_causal_real
    ),
    "bert-seq-cls": Case(lambda: tiny_encoders.build("bert"), lambda: tiny_encoders.example_inputs("bert"), "SEQ_CLS"),
    "t5-peft-layout": Case(
        lambda: tiny_seq2seq.build("t5"),
        lambda: {
            **tiny_seq2seq.encoder_inputs("t5", pad=[0, 2]),
            "decoder_input_ids": tiny_seq2seq.decoder_input_ids(),
        },
        "SEQ_2_SEQ_LM",
        ours_only={"encoder_decoder_layout": "peft"},
    ),
}


def randomise(parameters: list[nn.Parameter], seed: int = 2) -> None:
    """Normal weights from ``seed`` (scaled down a little), so the prefix and head copies matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor], case: Case) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs).logits
    return out[case.real(inputs)] if case.real is not None else out


def logits_with(handle: Attachment, inputs: dict[str, torch.Tensor], case: Case) -> torch.Tensor:
    with handle:
        return logits(handle.model, inputs, case)


def trained(case: Case, projection: bool, **fields: Any) -> PrefixAttachment:
    """A fresh model of ``case`` and a prefix (plus head copies) with random weights."""
    config = PrefixTuningConfig(
        num_virtual_tokens=P, prefix_projection=projection, task_type=case.task_type, **{**case.ours_only, **fields}
    )
    handle = attach_prefix(case.build(), config)
    randomise(list(handle.parameters()))
    return handle


def peft_trained(case: Case, projection: bool) -> peft.PeftModel:
    config = peft.PrefixTuningConfig(task_type=case.task_type, num_virtual_tokens=P, prefix_projection=projection)
    model = bridge_peft_cache_keyword(peft.get_peft_model(case.build(), config).eval())
    randomise([p for _, p in sorted(model.named_parameters()) if p.requires_grad], seed=7)
    return model


def peft_loaded(case: Case, folder: Path) -> peft.PeftModel:
    """PEFT's model of ``case`` with the adapter in ``folder``, as ``PeftModel.from_pretrained`` loads it."""
    return bridge_peft_cache_keyword(peft.PeftModel.from_pretrained(case.build(), folder).eval())


def tensors_of(folder: Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    return load_file(folder / name)


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("name", list(CASES))
def test_ours_to_ours_is_bitwise(name: str, projection: bool, tmp_path: Path) -> None:
    case = CASES[name]
    handle = trained(case, projection)
    inputs = case.inputs()
    base = logits(handle.model, inputs, case)
    ours = logits_with(handle, inputs, case)
    assert (ours - base).abs().max() > MIN_EFFECT
    handle.save(tmp_path / "a")
    assert (tmp_path / "a" / EXTRA).is_file() == projection

    frozen = load_adapter(handle.model, tmp_path / "a")
    assert isinstance(frozen, PrefixAttachment) and not frozen.encoder.prefix_projection
    assert torch.equal(frozen.encoder.embedding.weight, handle.encoder.folded_weight())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(logits_with(frozen, inputs, case), ours)

    resumed = load_adapter(handle.model, tmp_path / "a", trainable=True)
    assert isinstance(resumed, PrefixAttachment) and resumed.encoder.prefix_projection == projection
    assert resumed.config == handle.config
    mine, theirs = dict(resumed.named_parameters()), dict(handle.named_parameters())
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[key], theirs[key]) and mine[key].requires_grad for key in mine)
    resumed.save(tmp_path / "b")
    for file in (WEIGHTS, *([EXTRA] if projection else [])):
        first, second = tensors_of(tmp_path / "a", file), tensors_of(tmp_path / "b", file)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("name", list(CASES))
def test_peft_checkpoint_gives_peft_logits(name: str, projection: bool, tmp_path: Path) -> None:
    case = CASES[name]
    peft_model = peft_trained(case, projection)
    inputs = case.inputs()
    theirs = logits(peft_model, inputs, case)
    peft_model.save_pretrained(str(tmp_path))
    model = case.build()
    handle = load_adapter(model, tmp_path)
    assert isinstance(handle, PrefixAttachment)
    if name.startswith("t5"):
        assert handle.config.encoder_decoder_layout == "peft"  # PEFT's folder: PEFT's layout
    assert handle.config.position_offset is None
    assert (theirs - logits(model, inputs, case)).abs().max() > MIN_EFFECT
    torch.testing.assert_close(logits_with(handle, inputs, case), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("name", list(CASES))
def test_our_checkpoint_gives_our_logits_in_peft(name: str, projection: bool, tmp_path: Path) -> None:
    case = CASES[name]
    handle = trained(case, projection)
    inputs = case.inputs()
    ours = logits_with(handle, inputs, case)
    handle.save(tmp_path)
    peft_model = peft_loaded(case, tmp_path)
    torch.testing.assert_close(logits(peft_model, inputs, case), ours, atol=ATOL, rtol=0)


def test_position_offset_round_trips(tmp_path: Path) -> None:
    case = CASES["llama-gqa"]
    handle = trained(case, False, position_offset=0)
    inputs = case.inputs()
    ours = logits_with(handle, inputs, case)
    handle.save(tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["prefix_hooks"]["position_offset"] == 0
    loaded = load_adapter(handle.model, tmp_path)
    assert isinstance(loaded, PrefixAttachment) and loaded.config.position_offset == 0
    assert torch.equal(logits_with(loaded, inputs, case), ours)
    peft_model = peft_loaded(case, tmp_path)  # PEFT has no such setting
    assert (logits(peft_model, inputs, case) - ours).abs().max() > MIN_EFFECT


def test_full_layout_round_trips_and_peft_refuses_it(tmp_path: Path) -> None:
    case = CASES["t5-peft-layout"]
    handle = trained(case, True, encoder_decoder_layout="full")
    inputs = case.inputs()
    ours = logits_with(handle, inputs, case)
    handle.save(tmp_path)
    assert set(tensors_of(tmp_path)) == {FULL_LAYOUT_KEY}
    for trainable in (False, True):
        loaded = load_adapter(handle.model, tmp_path, trainable=trainable)
        assert isinstance(loaded, PrefixAttachment) and loaded.config.encoder_decoder_layout == "full"
        assert torch.equal(logits_with(loaded, inputs, case), ours)
    with pytest.raises(KeyError, match="prompt_embeddings"):
        peft.PeftModel.from_pretrained(case.build(), tmp_path)


# --- resume ---------------------------------------------------------------------------------------
def _train(handle: PrefixAttachment, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    model = handle.model
    batch = random_batch(2, 6, seed=3)
    losses = []
    with handle:
        model.train()
        for _ in range(steps):
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
    return losses


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_resume_continues_the_loss_curve(projection: bool, tmp_path: Path) -> None:
    """Six AdamW steps in one go equal three, a save, a trainable load into a fresh model and
    three more with the optimizer state carried over (same parameters in the same order)."""
    case = CASES["llama-gqa"]
    straight = trained(case, projection)
    optimizer = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    expected = _train(straight, optimizer, 6)

    first = trained(case, projection)
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    losses = _train(first, optimizer, 3)
    first.save(tmp_path)
    resumed = load_adapter(case.build(), tmp_path, trainable=True)
    assert isinstance(resumed, PrefixAttachment)
    assert [tuple(p.shape) for p in resumed.parameters()] == [tuple(p.shape) for p in first.parameters()]
    carried = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    carried.load_state_dict(optimizer.state_dict())
    losses += _train(resumed, carried, 3)
    assert expected[0] > expected[-1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), atol=1e-6, rtol=0)


# --- bad checkpoints -----------------------------------------------------------------------------
def rewrite(
    folder: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    extra: Callable[[dict[str, torch.Tensor]], None] | None = None,
    config: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Edit a saved folder in place: the checksums are dropped, so the codec sees the edits."""
    data = json.loads((folder / CONFIG).read_text())
    data["prefix_hooks"].pop("sha256", None)
    for name, edit in ((WEIGHTS, tensors), (EXTRA, extra)):
        if edit is not None:
            values = dict(load_file(folder / name)) if (folder / name).is_file() else {}
            edit(values)
            save_file(values, folder / name)
            data["prefix_hooks"]["extra_file"] = (folder / EXTRA).is_file()
    if config is not None:
        config(data)
    (folder / CONFIG).write_text(json.dumps(data))


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__delitem__(key)


def _config(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.__setitem__(key, value)


BAD: dict[str, tuple[bool, dict[str, Any], str]] = {  # name -> (projection, rewrite edits, error pattern)
    "missing-prompt": (False, {"tensors": _drop("prompt_embeddings")}, r"missing keys \['prompt_embeddings'\]"),
    "unexpected-key": (False, {"tensors": _set("stray", torch.zeros(2))}, r"unexpected keys \['stray'\]"),
    "wrong-shape": (False, {"tensors": _set("prompt_embeddings", torch.zeros(P, 65))}, r"shape \(3, 65\).*\(3, 64\)"),
    "integer-dtype": (
        False,
        {"tensors": _set("prompt_embeddings", torch.zeros(P, 64, dtype=torch.int32))},
        "floating-point",
    ),
    "extra-without-projection": (False, {"extra": _set("embedding.weight", torch.zeros(P, 16))}, "no extra tensors"),
    "extra-missing-key": (
        True,
        {"extra": _drop("transform.2.bias")},
        r"extra file.*missing keys \['transform.2.bias'\]",
    ),
    "extra-wrong-shape": (
        True,
        {"extra": _set("embedding.weight", torch.zeros(P, 17))},
        r"'embedding.weight'.*\(3, 17\)",
    ),
    "extra-from-another-save": (
        True,
        {"extra": _set("transform.2.bias", torch.ones(64))},
        "differs from the saved 'prompt_embeddings'",
    ),
    "another-architecture": (False, {"config": _config("token_dim", 32)}, r"token_dim=32.*width 16"),
    "another-depth": (False, {"config": _config("num_layers", 4)}, r"num_layers=4.*2 attention layers"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_checkpoint_is_refused_and_model_untouched(name: str, tmp_path: Path) -> None:
    projection, edits, pattern = BAD[name]
    case = CASES["llama-gqa"]
    handle = trained(case, projection)
    handle.save(tmp_path)
    rewrite(tmp_path, **edits)
    model = case.build()
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        load_adapter(model, tmp_path, trainable=True)
    assert_untouched(model, before)


def test_peft_projection_checkpoint_cannot_resume(tmp_path: Path) -> None:
    """PEFT saves only the folded prefix: trainable=True with a projection is refused (PEFT
    itself cannot resume it either); trainable=False loads it."""
    case = CASES["llama-gqa"]
    peft_trained(case, projection=True).save_pretrained(str(tmp_path))
    model = case.build()
    warm_up(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="trainable=True.*prefix_projection=True.*only the folded prefix"):
        load_adapter(model, tmp_path, trainable=True)
    assert_untouched(model, before)
    assert isinstance(load_adapter(model, tmp_path), PrefixAttachment)


def test_folder_without_checksums_still_loads(tmp_path: Path) -> None:
    """The rewrite helper itself does not break a folder (so the failures above are the edits')."""
    case = CASES["llama-gqa"]
    handle = trained(case, True)
    handle.save(tmp_path)
    rewrite(tmp_path, tensors=lambda tensors: None, extra=lambda tensors: None)
    loaded = load_adapter(case.build(), tmp_path, trainable=True)
    assert isinstance(loaded, PrefixAttachment) and loaded.encoder.prefix_projection


def test_copy_of_folder_loads_under_another_name(tmp_path: Path) -> None:
    case = CASES["llama-gqa"]
    handle = trained(case, False)
    handle.save(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    loaded = load_adapter(handle.model, tmp_path / "b", adapter_name="other")
    assert loaded.adapter_name == "other"
    assert torch.equal(logits_with(loaded, case.inputs(), case), logits_with(handle, case.inputs(), case))


def test_save_after_a_fused_optimizer_step_holds_the_trained_prefix(tmp_path: Path) -> None:
    """A fused AdamW step (the Trainer's default optimizer) changes the parameters without bumping
    their version counters: the saved prefix must still be the one the trained parameters give."""
    case = CASES["llama-gqa"]
    handle = trained(case, True)
    handle.encoder.folded_weight()  # fills the encoder's no-grad cache
    _train(handle, torch.optim.AdamW(handle.parameters(), lr=0.1, fused=True), 1)
    handle.save(tmp_path)
    with torch.no_grad():
        expected = handle.encoder.transform(handle.encoder.embedding.weight)  # (P, L*2*token_dim)
    assert torch.equal(tensors_of(tmp_path)["prompt_embeddings"], expected)
    resumed = load_adapter(case.build(), tmp_path, trainable=True)  # the extra file agrees with it
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), handle.parameters(), strict=True))


def test_attach_and_attach_prefix_take_a_peft_folder(tmp_path: Path) -> None:
    case = CASES["gpt2"]
    peft_model = peft_trained(case, projection=False)
    inputs = case.inputs()
    theirs = logits(peft_model, inputs, case)
    peft_model.save_pretrained(str(tmp_path))
    model = case.build()
    torch.testing.assert_close(
        logits_with(attach_prefix(model, str(tmp_path)), inputs, case), theirs, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(logits_with(attach(model, tmp_path), inputs, case), theirs, atol=ATOL, rtol=0)
