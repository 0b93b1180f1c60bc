"""Every ```python block of the package README and of the package's documentation pages
(``docs/recurrent-transformer/*.md``) runs, each in a fresh namespace after
``torch.manual_seed(0)`` (a block carries its own imports). Outside a checkout (no README next
to the tests, no docs/ above them) the tests skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1]
README = PACKAGE / "README.md"
DOCS = PACKAGE.parents[1] / "docs" / "recurrent-transformer"

# an opening fence: indentation, three or more backticks or tildes, the language ``python``
_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*python(?:[ \t{].*)?$")


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``text``, dedented, in order.

    A block ends at a line holding only a fence of the same character and at least the opening
    length (CommonMark); an unclosed block runs to the end of the text.
    """
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _OPENING.match(lines[i])
        i += 1
        if opening is None:
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body = []
        while i < len(lines) and not closing.match(lines[i]):
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip())) :])
            i += 1
        i += 1
        blocks.append("\n".join(body) + "\n")
    return blocks


def pages() -> list[Path]:
    """The README, then the documentation pages of this package (when in a checkout)."""
    found = [README] if README.is_file() else []
    return found + (sorted(DOCS.glob("*.md")) if DOCS.is_dir() else [])


def collect_examples() -> list:
    params = []
    for page in pages():
        name = "README.md" if page == README else f"docs/recurrent-transformer/{page.name}"
        for number, code in enumerate(python_blocks(page.read_text(encoding="utf-8")), start=1):
            params.append(pytest.param(name, code, id=f"{name}:{number}"))
    return params


EXAMPLES = collect_examples()


def test_the_readme_has_examples():
    if not README.is_file():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 5


def test_the_guide_has_examples():
    if not DOCS.is_dir():
        pytest.skip("docs/recurrent-transformer not found (not a repository checkout)")
    guide = DOCS / "index.md"
    assert len(python_blocks(guide.read_text(encoding="utf-8"))) >= 5
    assert {param.values[0] for param in EXAMPLES} >= {
        "README.md",
        "docs/recurrent-transformer/index.md",
    }


@pytest.mark.parametrize("page,code", EXAMPLES)
def test_example_runs(page, code):
    torch.manual_seed(0)
    exec(compile(code, page, "exec"), {"__name__": "example"})


def test_block_parser():
    text = (
        "intro\n```python\nx = 1\n```\n```\nnot python\n```\n```bash\nnox\n```\n"
        '!!! note\n    ```python title="x.py"\n    y = 2\n        z = 3\n    ```\n'
        "````python\n```\nw = 4\n````\n"
    )
    assert python_blocks(text) == ["x = 1\n", "y = 2\n    z = 3\n", "```\nw = 4\n"]
