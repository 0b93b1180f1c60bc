"""Runnable Markdown: the Python blocks of READMEs and documentation pages.

They are collected so that each package's tests execute every example (no example rots).

``python_blocks`` follows CommonMark fences closely enough for our pages: backtick or tilde
fences of three or more characters, an info string starting with ``python``, indented fences
(inside admonitions), and closing fences at least as long as the opening one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["markdown_examples", "python_blocks", "run_example"]

# an opening fence: indentation, three or more backticks or tildes, the language ``python``
_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*python(?:[ \t{].*)?$")


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown ``text``, dedented, in order of appearance.

    A block ends at a line holding only a fence of the same character and at least the
    opening length (CommonMark); an unclosed block runs to the end of the text.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
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


def markdown_examples(pages: list[Path], root: Path) -> list[tuple[str, str]]:
    """``(name, code)`` for every python block of the existing ``pages``.

    ``name`` is ``<path relative to root>:<block number>`` (1-based)."""
    examples = []
    for page in pages:
        if not page.is_file():
            continue
        name = page.relative_to(root).as_posix()
        for number, code in enumerate(python_blocks(page.read_text(encoding="utf-8")), start=1):
            examples.append((f"{name}:{number}", code))
    return examples


def run_example(name: str, code: str, *, module: str = "__docs_example__", threads: int = 1):
    """Execute one example in a fresh namespace after ``torch.manual_seed(0)``.

    Runs with ``threads`` torch threads (restored afterwards); returns the namespace."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    namespace = {"__name__": module}
    try:
        exec(compile(code, name, "exec"), namespace)
    finally:
        torch.set_num_threads(previous)
    return namespace
