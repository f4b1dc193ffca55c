"""The method x family feature matrix: what the tests run, and the docs table rendered from it.

Two sources, both read from the test suite itself so ``docs/families.md`` cannot drift:

- :data:`CELLS`: every (method, family) pair that ``tests/families/test_feature_matrix.py`` runs (the
  adapter changes the output, detach restores it bit-exactly, cached greedy generation equals
  uncached) or checks is refused with a clear error (:data:`REFUSED`).
- PEFT parity: the family names in the parametrize ids of the PEFT-parity test files, collected
  by ``pytest --collect-only`` (:func:`parity_cells`).

``python tests/support/feature_matrix.py --write`` rewrites the page's table; the test fails when the
page's table differs from :func:`render`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tiny_encoders
import tiny_inline
import tiny_models
import tiny_seq2seq

from prefix_hooks import supported

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "families.md"
"""The page that shows the table, between :data:`START` and :data:`END`."""
START, END = "<!-- feature-table:start -->", "<!-- feature-table:end -->"

METHODS = ("prefix", "lora", "dora", "adalora", "prompt", "p-tuning", "ia3")
TITLES = {
    "prefix": "Prefix", "lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA", "prompt": "Prompt tuning", "p-tuning": "P-tuning", "ia3": "IA3",
}

KINDS: dict[str, tuple[str, ...]] = {
    "decoder-only": (*tiny_models.FAMILIES, *tiny_inline.FAMILIES),
    "encoder-only": tiny_encoders.TEXT_FAMILIES,
    "encoder-decoder": tuple(f for f in tiny_seq2seq.FAMILIES if f != "whisper"),
    "vision": tiny_encoders.VISION_FAMILIES,
    "speech": ("whisper",),
    "multimodal": (tiny_encoders.LLAVA,),
}
"""Family kind -> model types, in the table's order."""

REFUSED: dict[str, tuple[str, ...]] = {
    # prompt methods prepend token embeddings: no token inputs (vision, speech), or llava's image
    # placeholders, which a prepended prompt would misalign
    "prompt": ("vit", "deit", "dinov2", "whisper", "llava"),
    "p-tuning": ("vit", "deit", "dinov2", "whisper", "llava"),
}
"""Method -> families it refuses with an error (tested)."""

GENERATING = frozenset((*KINDS["decoder-only"], *KINDS["encoder-decoder"]))
"""Families whose cached greedy generation is compared with uncached generation."""

CELLS: list[tuple[str, str]] = [
    (method, family)
    for method in METHODS
    for kind in KINDS.values()
    for family in kind
    if family not in REFUSED.get(method, ())
]
"""(method, family) pairs the matrix test runs."""

PARITY_FILES: dict[str, str] = {
    "tests/prefix/test_peft_parity.py": "prefix",
    "tests/families/test_encoder_peft_parity.py": "prefix",
    "tests/families/test_seq2seq_peft.py": "prefix",
    "tests/families/test_inline_peft.py": "prefix",
    "tests/lora/test_lora_peft_parity.py": "lora",
    "tests/lora/test_dora_peft_parity.py": "dora",
    "tests/lora/test_adalora_peft_parity.py": "adalora",
    "tests/prompt/test_prompt_peft_parity.py": "prompt",  # ids naming mlp/lstm are P-tuning
    "tests/ia3/test_ia3_peft_parity.py": "ia3",
}


def families_in(test_id: str) -> set[str]:
    """Model types named in a parametrize id, longest names first (``xlm-roberta`` is not
    ``roberta``; variants such as ``falcon_mha`` or ``gpt_neo_window`` count as their family)."""
    found = set()
    rest = test_id
    for family in sorted(supported(), key=len, reverse=True):
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(family)}(?:_[a-z0-9]+)*(?![A-Za-z0-9])"
        if re.search(pattern, rest):
            found.add(family)
            rest = re.sub(pattern, " ", rest)
    return found


def parity_cells() -> set[tuple[str, str]]:
    """(method, family) pairs some PEFT-parity test runs, from ``pytest --collect-only``."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *PARITY_FILES]
    listing = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cells = set()
    for line in listing.splitlines():
        path, _, rest = line.partition("::")
        if path not in PARITY_FILES or "[" not in rest:
            continue
        ids = rest[rest.index("[") + 1 : rest.rindex("]")]
        method = PARITY_FILES[path]
        if method == "prompt" and re.search(r"(?<![a-z])(mlp|lstm)(?![a-z])", ids):
            method = "p-tuning"
        cells |= {(method, family) for family in families_in(ids)}
    return cells


def render(parity: set[tuple[str, str]]) -> str:
    """The table: ✓ tested, ✓ᴾ also equal to PEFT on identical weights, ✗ refused."""
    header = "| Kind | Family | " + " | ".join(TITLES[m] for m in METHODS) + " |"
    lines = [header, "|" + "---|" * (len(METHODS) + 2)]
    tested = set(CELLS)
    for kind, families in KINDS.items():
        for family in families:
            marks = []
            for method in METHODS:
                if (method, family) in tested:
                    marks.append("✓ᴾ" if (method, family) in parity else "✓")
                elif family in REFUSED.get(method, ()):
                    marks.append("✗")
                else:
                    raise AssertionError(f"{method} x {family} is neither tested nor refused")
            lines.append(f"| {kind} | `{family}` | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def page_table(text: str) -> str:
    """The table between the page's markers."""
    if START not in text or END not in text:
        raise ValueError(f"{PAGE.relative_to(ROOT)} has no {START} ... {END} block")
    return text[text.index(START) + len(START) : text.index(END)].strip("\n")


def write_page() -> None:
    text = PAGE.read_text()
    table = render(parity_cells())
    PAGE.write_text(text[: text.index(START) + len(START)] + "\n" + table + "\n" + text[text.index(END) :])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_page()
    else:
        print(render(parity_cells()))
