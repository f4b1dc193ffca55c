"""Where PEFT 0.21.2 breaks on transformers 5.24+ and prefix_hooks does not, measured.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``; PEFT 0.21.2 still
looks for the old name (:data:`shared_fixtures.PEFT_CACHE_KEYWORD_STALE` says where). Each
``measure_*`` function gives one row: PEFT's error or its largest distance to the oracle, ours,
and how far the adapter moves the output (so a small distance means something).
``python tests/integration/test_peft_breakage.py`` prints the table. The oracles are neither PEFT's broken
path nor prefix_hooks:

* prefix on a BERT classifier: the same BERT run with the prefix's keys/values as its cache
  and ``P`` ones before the mask (PEFT's method, without PEFT), the head applied by hand;
* cached generate(): logits of one forward over the generated tokens, without generate()'s
  cache (PEFT's forward, its cache keyword translated by ``bridge_peft_cache_keyword``).

Where ``PEFT_CACHE_KEYWORD_STALE`` the tests assert PEFT fails as described and ours matches the
oracle; elsewhere that PEFT matches it too, so the table stays true.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from shared_fixtures import PEFT_CACHE_KEYWORD_STALE, bridge_peft_cache_keyword, cache_kwargs
from tiny_encoders import attach_random_prefix, build_head, text_batch
from tiny_models import build_model, random_batch
from tiny_prompt import randomise_prompt
from tiny_seq2seq import build as build_seq2seq
from tiny_seq2seq import encoder_inputs
from tiny_seq2seq import randomise as randomise_prefix
from transformers import DynamicCache, PreTrainedModel

from prefix_hooks import Attachment, PrefixTuningConfig, attach_prefix
from prefix_hooks.prompt import PromptTuningConfig, attach_prompt

P = 3  # num_virtual_tokens
NEW_TOKENS = 5
ATOL = 1e-5  # float32 round-off: agreeing
BROKEN = 1e-2  # far beyond round-off: disagreeing
PEFT_TASKS = {"sequence": "SEQ_CLS", "token": "TOKEN_CLS"}


@dataclass(frozen=True)
class Row:
    """One case: PEFT's distance to the oracle (or the error it raises), ours, and the adapter's effect."""

    case: str
    peft: float | str
    ours: float
    effect: float


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- a prefix on a BERT classifier ---------------------------------------------------------------
def _prefix_as_cache(model: Any, prefix: torch.Tensor, inputs: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """``model``'s logits with ``prefix`` ``(P, L * 2 * H * D)`` given to BERT as a cache of ``P`` positions
    (so real tokens sit at ``P..``) and ``P`` ones prepended to the mask: PEFT's method, run by hand."""
    config = model.config
    batch, heads = inputs["input_ids"].shape[0], config.num_attention_heads
    per_layer = prefix.view(P, config.num_hidden_layers, 2, heads, -1).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
    cache = DynamicCache()
    for index, (keys, values) in enumerate(per_layer):
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)  # (B, H, P, D)
    mask = torch.cat([torch.ones(batch, P, dtype=torch.long), inputs["attention_mask"]], dim=1)  # (B, P + T)
    outputs = model.bert(input_ids=inputs["input_ids"], attention_mask=mask, **cache_kwargs(model.bert, cache))
    features = outputs.pooler_output if head == "sequence" else outputs.last_hidden_state
    return model.classifier(features)  # eval: dropout is the identity


@torch.no_grad()
def measure_classifier_prefix(head: str) -> tuple[Row, float]:
    """The row, and bridged PEFT's distance to the oracle (the stand-in other tests compare with)."""
    inputs = text_batch("bert", 2, seed=1, right_pad=[0, 3])
    model: Any = build_head("bert", head)
    base = model(**inputs).logits
    handle = attach_random_prefix(model, P)
    with handle:
        ours = model(**inputs).logits
    expected = _prefix_as_cache(model, handle.encoder.prefix(), inputs, head)
    config = peft.PrefixTuningConfig(task_type=PEFT_TASKS[head], num_virtual_tokens=P)
    peft_model = peft.get_peft_model(build_head("bert", head), config).eval()
    peft_model.prompt_encoder["default"].load_state_dict(handle.encoder.state_dict())
    theirs: float | str
    try:
        theirs = _gap(peft_model(**inputs).logits, expected)
    except ValueError as error:
        theirs = f"raises ValueError: {error}"
    bridged = _gap(bridge_peft_cache_keyword(peft_model)(**inputs).logits, expected)
    return Row(f"prefix, BERT {head} classification", theirs, _gap(ours, expected), _gap(base, expected)), bridged


@pytest.mark.parametrize("head", list(PEFT_TASKS))
def test_prefix_on_a_bert_classifier(head: str) -> None:
    row, bridged = measure_classifier_prefix(head)
    assert row.effect > BROKEN and row.ours <= ATOL and bridged <= ATOL
    if PEFT_CACHE_KEYWORD_STALE:
        assert isinstance(row.peft, str) and "does not support past key values" in row.peft
    else:
        assert isinstance(row.peft, float) and row.peft <= ATOL


# --- cached generate() ---------------------------------------------------------------------------
def _generate(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """Greedy generate() with its raw logits."""
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True,
        )


def _peft_generate(peft_model: Any, inputs: dict[str, torch.Tensor]) -> tuple[Any, list[str]]:
    """PEFT's :func:`_generate`, and the warnings it raised, recorded rather than raised (on 5.24+
    transformers warns about the ``past_key_values`` PEFT hands over; asserted below)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = _generate(peft_model, inputs)
    return output, [str(warning.message) for warning in caught]


@torch.no_grad()
def _forward_logits(model: Any, inputs: dict[str, torch.Tensor], sequences: torch.Tensor, seq2seq: bool) -> torch.Tensor:
    """The logits one forward gives for each generated token of ``sequences``: ``(B, NEW_TOKENS, V)``."""
    if seq2seq:  # sequences: decoder start + NEW_TOKENS
        return model(**inputs, decoder_input_ids=sequences[:, :-1]).logits
    ids = sequences[:, :-1]  # (B, T + NEW_TOKENS - 1), unpadded: positions 0.. as in generate()
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -NEW_TOKENS:]


def _logits(output: Any) -> torch.Tensor:
    return torch.stack(output.logits, dim=1)  # (B, NEW_TOKENS, V)


def measure_generate(method: str, family: str) -> tuple[Row, list[str]]:
    """Cached greedy generate() of PEFT and ours against PEFT's forward over each one's tokens; also
    the warnings PEFT's generate() raised."""
    seq2seq = family in ("t5", "bart")
    build = build_seq2seq if seq2seq else build_model
    inputs = encoder_inputs(family, pad=[0, 2]) if seq2seq else random_batch(2, 5, seed=4)
    model: PreTrainedModel = build(family)
    handle: Attachment
    if method == "prefix":
        layout: dict[str, Any] = {"encoder_decoder_layout": "peft"} if seq2seq else {}
        handle = attach_prefix(model, PrefixTuningConfig(num_virtual_tokens=P, **layout))
        randomise_prefix(handle.encoder)
        config: Any = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", num_virtual_tokens=P)
        state = handle.encoder.state_dict()
    else:
        prompt = randomise_prompt(attach_prompt(model, PromptTuningConfig(num_virtual_tokens=P)), scale=2.0)
        handle, state = prompt, prompt.prompt_encoder.state_dict()
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft_model: Any = peft.get_peft_model(build(family), config).eval()
    peft_model.prompt_encoder["default"].load_state_dict(state)
    oracle = bridge_peft_cache_keyword(peft.get_peft_model(build(family), config).eval())
    oracle.prompt_encoder["default"].load_state_dict(state)
    with handle:
        ours = _generate(model, inputs)
    theirs, peft_warnings = _peft_generate(peft_model, inputs)
    expected = _forward_logits(oracle, inputs, ours.sequences, seq2seq)
    row = Row(
        f"{method}, {family} cached generate()",
        _gap(_logits(theirs), _forward_logits(oracle, inputs, theirs.sequences, seq2seq)),
        _gap(_logits(ours), expected),
        _gap(_forward_logits(model, inputs, ours.sequences, seq2seq), expected),  # the base model's logits
    )
    return row, peft_warnings


GENERATE_CASES = [("prefix", "llama"), ("prompt", "llama"), ("prompt", "gpt2"), ("prefix", "t5"), ("prefix", "bart")]


@pytest.mark.parametrize(("method", "family"), GENERATE_CASES)
def test_cached_generate(method: str, family: str) -> None:
    row, peft_warnings = measure_generate(method, family)
    assert row.effect > BROKEN and row.ours <= ATOL
    assert isinstance(row.peft, float)
    if not PEFT_CACHE_KEYWORD_STALE:
        assert row.peft <= ATOL
        return
    assert row.peft > BROKEN
    if method == "prefix":  # transformers says it ignored the prefix PEFT passed as past_key_values
        assert any("past_key_values" in message for message in peft_warnings), peft_warnings


def table() -> str:
    """The measured rows as a markdown table."""
    rows = [measure_classifier_prefix(head)[0] for head in PEFT_TASKS]
    rows += [measure_generate(method, family)[0] for method, family in GENERATE_CASES]
    lines = ["| case | PEFT 0.21.2 vs oracle | prefix_hooks vs oracle | adapter's effect |", "|---|---|---|---|"]
    for row in rows:
        peft_cell = row.peft if isinstance(row.peft, str) else f"{row.peft:.2g}"
        lines.append(f"| {row.case} | {peft_cell} | {row.ours:.2g} | {row.effect:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import transformers

    print(f"transformers {transformers.__version__}, peft {peft.__version__}\n\n{table()}")
