"""Every ```python block of the package README and of the package's documentation pages
(docs/feedback-transformer/*.md) runs, each in a fresh namespace after
``torch.manual_seed(0)`` (a block carries its own imports). Outside a checkout the files are
missing and the tests skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1]
PAGES = [
    PACKAGE / "README.md",
    *sorted((PACKAGE.parents[1] / "docs" / "feedback-transformer").glob("*.md")),
]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``text``, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def _examples() -> list:
    params = []
    for page in PAGES:
        if not page.is_file():
            continue
        name = page.relative_to(PACKAGE.parents[1]) if "docs" in page.parts else "README.md"
        for i, code in enumerate(python_blocks(page.read_text())):
            params.append(pytest.param(str(name), code, id=f"{name}-{i}"))
    return params


def test_the_pages_have_examples():
    readme = PACKAGE / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(python_blocks(readme.read_text())) >= 5  # the seed's three and more


@pytest.mark.parametrize(("page", "code"), _examples())
def test_example_runs(page, code):
    torch.manual_seed(0)
    exec(compile(code, page, "exec"), {"__name__": "feedback_transformer_example"})


def test_block_parser():
    text = "intro\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
