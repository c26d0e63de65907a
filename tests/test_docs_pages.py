"""The documentation pages in docs/ run as written.

Each page (every ``docs/*.md`` but design.md) is a tutorial: its ```python
blocks run in order in one namespace, so a later block uses the names of an
earlier one. A block fenced ```python no-run is shown but not run (for the
rare block that cannot run in a test, such as a multi-process launch; shell
commands go in ```bash blocks). tests/conftest.py gives each page float64
and a clean param store with seed 0.

Tracebacks point into the page: each block is compiled with the page's path
as its file name and its own line numbers.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOT_PAGES = {"design.md"}  # the design notes: mathematics, not a tutorial
RUN, NO_RUN = "python", "python no-run"


def pages():
    return sorted(p for p in DOCS.glob("*.md") if p.name not in NOT_PAGES)


def fenced_blocks(text):
    """``(info, first_line, code)`` for every fenced block of a page: ``info``
    the text after the opening fence, ``first_line`` the 1-based line of the
    block's first line of code. Fences start in column 0; an unclosed one is
    an error."""
    blocks, info, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if info is None:
            if line.startswith("```"):
                info, start, lines = line[3:].strip(), number + 1, []
        elif line.rstrip() == "```":
            blocks.append((info, start, "\n".join(lines) + "\n"))
            info = None
        else:
            lines.append(line)
    if info is not None:
        raise AssertionError(f"the block opened at line {start - 1} is never closed")
    return blocks


def python_blocks(path):
    """The page's python blocks ``(first_line, code, runs)``, checked to be
    every block that looks like python: a fence the parser did not take
    (indented, say) or an info string it does not know (a misspelt
    ``no-run``) would otherwise be skipped in silence."""
    text = path.read_text()
    python = [(info, start, code) for info, start, code in fenced_blocks(text) if info.startswith("python")]
    unknown = [info for info, _, _ in python if info not in (RUN, NO_RUN)]
    assert not unknown, f"{path.name}: unknown python fence(s) {unknown}; use ```python or ```python no-run"
    found = [(start, code, info == RUN) for info, start, code in python]
    fences = len(re.findall(r"^\s*```\s*python", text, flags=re.M))
    assert fences == len(found), (
        f"{path.name}: {fences} python fences but {len(found)} python blocks parsed "
        "(fences must start in column 0)"
    )
    return found


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.stem)
def test_page_runs(path):
    blocks = python_blocks(path)
    assert any(runs for _, _, runs in blocks) or path.name == "index.md", f"{path.name} has no code to run"
    namespace = {"__name__": f"docs.{path.stem}"}
    for first_line, code, runs in blocks:
        if runs:
            # blank lines in front, so that line numbers in tracebacks are the page's
            exec(compile("\n" * (first_line - 1) + code, str(path), "exec"), namespace)


def test_every_page_is_linked_from_the_index():
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\((?:\./)?([\w.-]+\.md)(?:#[\w-]*)?\)", index))
    missing = [p.name for p in pages() if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.stem)
def test_local_links_resolve(path):
    """Links to files of the repository (other pages, benchmark results) name
    files that exist."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    broken = [t for t in local if t and not (path.parent / t).exists()]
    assert not broken, f"{path.name} links to missing files {broken}"
