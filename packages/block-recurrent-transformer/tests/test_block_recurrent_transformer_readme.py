"""Every ```python block of the package README and of its documentation page
(``docs/block-recurrent-transformer/index.md``) runs, each in a fresh namespace after
``torch.manual_seed(0)`` (a block carries its own imports). Outside a checkout (files missing)
the tests skip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1]
PAGES = {
    "README.md": PACKAGE / "README.md",
    "docs/index.md": PACKAGE.parents[1] / "docs" / "block-recurrent-transformer" / "index.md",
}
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``text``, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def _examples() -> list[tuple[str, int]]:
    return [
        (name, index)
        for name, path in PAGES.items()
        if path.is_file()
        for index in range(len(python_blocks(path.read_text())))
    ]


@pytest.mark.parametrize("name", list(PAGES))
def test_the_pages_have_examples(name):
    if not PAGES[name].is_file():
        pytest.skip(f"{name} is not next to the tests (installed package)")
    assert len(python_blocks(PAGES[name].read_text())) >= 3


@pytest.mark.parametrize(("name", "index"), _examples(), ids=lambda v: str(v))
def test_example_runs(name, index):
    code = python_blocks(PAGES[name].read_text())[index]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        exec(compile(code, f"{name} block {index}", "exec"), {"__name__": f"example_{index}"})
    finally:
        torch.set_num_threads(threads)


def test_block_parser():
    text = "intro\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
