"""Every ```python block of the package README runs, each in a fresh namespace after
``torch.manual_seed(0)`` (a block carries its own imports). Outside a checkout (no README next
to the tests) the test skips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of ``text``, in order."""
    return [match.group(1) for match in _BLOCK.finditer(text)]


def test_the_readme_has_examples():
    if not README.is_file():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(python_blocks(README.read_text())) >= 5


@pytest.mark.parametrize(
    "index", range(len(python_blocks(README.read_text())) if README.is_file() else 0)
)
def test_readme_example_runs(index):
    code = python_blocks(README.read_text())[index]
    torch.manual_seed(0)
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})


def test_block_parser():
    text = "intro\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
