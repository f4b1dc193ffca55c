"""The documentation cannot rot: its code runs and its links resolve.

* Every ```` ```python ```` block of ``README.md`` and ``docs/*.md`` runs, each page's blocks in
  order in one namespace (a later block sees the names an earlier one defined), in a fresh
  working folder. A failure names the page and the block's line; the traceback's line numbers
  are the page's own.
* A block that cannot run here (the hub, a GPU, several processes) carries
  ``<!-- not run: why -->`` on the line before it; the reason is required and such blocks
  are few.
* Every relative link of those pages points at a file that exists (and at a heading that
  exists, for ``page.md#anchor``), and every docs page is linked from the README.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from prefix_hooks.prefix import architecture

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

MAX_NOT_RUN = 4
"""Blocks marked ``<!-- not run: ... -->`` in all pages together."""

FENCE = re.compile(r"^(?P<indent> *)```(?P<language>\S*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(?P<reason>.*?)-->\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
LANGUAGES = {"python", "bash", "text"}
"""Fence languages a page may use; a bare fence could hide Python from the runner."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """1-based line of the block's first code line."""
    language: str
    code: str
    """The block's lines, dedented by the fence's indentation (list items indent their blocks)."""
    not_run: str | None
    """The reason of a ``<!-- not run: reason -->`` on the line before the fence (may be empty), else None."""

    @property
    def where(self) -> str:
        return f"{shown(self.page)}:{self.line}"


def shown(page: Path) -> Path:
    """``page`` relative to the repository (as a reader names it), or as is outside it."""
    return page.relative_to(ROOT) if page.is_relative_to(ROOT) else page


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{shown(page)}:{index + 1}: the code block is never closed")
        marker = NOT_RUN.match(lines[index - 1]) if index else None
        blocks.append(Block(
            page=page,
            line=index + 2,
            language=opening["language"],
            code="\n".join(line[indent:] for line in lines[index + 1 : end]),
            not_run=marker["reason"].strip() if marker else None,
        ))
        index = end + 1
    return blocks


def run_page(page: Path) -> None:
    """Run the page's Python blocks in order, in one namespace."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks_of(page):
        if block.language != "python" or block.not_run is not None:
            continue
        # leading newlines put the block at its own lines, so the traceback points into the page
        code = compile("\n" * (block.line - 1) + block.code, str(shown(block.page)), "exec")
        try:
            exec(code, namespace)  # noqa: S102  (the docs' own code, the point of this test)
        except Exception as error:  # noqa: BLE001  (whatever a block raises is reported with its page and line)
            frames = error.__traceback__.tb_next if error.__traceback__ else None  # the block's frames, not ours
            trace = "".join(traceback.format_exception(type(error), error, frames))
        else:
            continue
        pytest.fail(f"the block at {block.where} failed:\n{trace}", pytrace=False)


@pytest.fixture
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page may register a family (docs/families.md does): the registry is put back after the page."""
    monkeypatch.setattr(architecture, "_ADAPTERS", dict(architecture._ADAPTERS))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
@pytest.mark.usefixtures("isolated_registries")
def test_the_pages_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples save to relative folders ("out/adapter")
    run_page(page)


def test_blocks_not_run_say_why_and_are_few() -> None:
    marked = [block for page in PAGES for block in blocks_of(page) if block.not_run is not None]
    listing = "\n".join(f"  {block.where}: {block.not_run or '(no reason)'}" for block in marked)
    print(f"blocks not run:\n{listing}")  # shown by `pytest -rP`
    assert all(block.not_run for block in marked), f"a block marked not run gives no reason:\n{listing}"
    assert all(block.language == "python" for block in marked), f"only Python blocks are run or marked:\n{listing}"
    assert len(marked) <= MAX_NOT_RUN, f"{len(marked)} blocks are not run (at most {MAX_NOT_RUN}):\n{listing}"


def test_every_fence_names_its_language() -> None:
    unnamed = [block.where for page in PAGES for block in blocks_of(page) if block.language not in LANGUAGES]
    assert unnamed == [], f"fences need one of {sorted(LANGUAGES)}: {unnamed}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose_of(page: Path) -> str:
    """The page without its code blocks (a ``# comment`` there is no heading, ``x[i](y)`` no link)."""
    return re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def anchors_of(page: Path) -> set[str]:
    return {slug(match[1]) for match in re.finditer(r"^#{1,6} (.+)$", prose_of(page), flags=re.MULTILINE)}


def links_of(page: Path) -> list[str]:
    return [match["target"] for match in LINK.finditer(prose_of(page))]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links_of(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    assert broken == [], f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links_of(README)}
    missing = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert DOCS.is_dir() and missing == [], f"README.md links no docs/{missing}"


def test_the_block_parser_sees_indented_blocks_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# T\n\n- item\n\n  ```python\n  x = 1\n  ```\n\n<!-- not run: needs a GPU -->\n```python\ny\n```\n"
    )
    first, second = blocks_of(page)
    assert (first.line, first.code, first.not_run) == (6, "x = 1", None)
    assert (second.line, second.code, second.not_run) == (11, "y", "needs a GPU")
