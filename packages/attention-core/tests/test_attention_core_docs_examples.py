"""Every ```python block of attention-core's README and of the documentation site runs.

Blocks are collected from ``packages/attention-core/README.md`` and ``docs/**/*.md`` (the pages
of the three model packages are left to their own test suites) of the repository checkout
that holds this file, and each one runs on its own in a fresh namespace after
``torch.manual_seed(0)``. A block must therefore carry its own imports. After each block the
attentions it defined are unregistered and the listeners it added to shared event dispatchers
removed, so that one example cannot break the next. Another test checks that every page named
in the ``nav`` of ``mkdocs.yml`` exists.

Outside a checkout (e.g. an installed sdist) the files are missing and the tests skip.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attention_core.builders  # noqa: F401  (registers every attention before the snapshots)
from attention_core.attention_registry import (
    AttentionRegistry,
    RecurrentAttentionRegistry,
    RecurrentCrossAttentionRegistry,
)
from attention_core.events import EventDispatcher
from attention_core.testing.markdown import markdown_examples, python_blocks, run_example

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[1]
DOCS = ROOT / "docs"
README = PACKAGE / "README.md"
MKDOCS = ROOT / "mkdocs.yml"
MODEL_PACKAGES = ("recurrent-transformer", "block-recurrent-transformer", "feedback-transformer")


def documentation_pages() -> list[Path]:
    """README.md of attention-core, then every docs page outside the model packages' folders."""
    pages = [README] if README.is_file() else []
    for page in sorted(DOCS.rglob("*.md")):
        relative = page.relative_to(DOCS)
        if relative.parts[0] not in MODEL_PACKAGES:
            pages.append(page)
    return pages


def collect_examples() -> list:
    return [
        pytest.param(name.rsplit(":", 1)[0], code, id=name)
        for name, code in markdown_examples(documentation_pages(), ROOT)
    ]


EXAMPLES = collect_examples()


def test_python_blocks_parser():
    text = (
        "intro\n```python\na = 1\n```\n\n```bash\nnox\n```\n"
        '!!! note\n    ```python title="x.py"\n    b = 2\n        c = 3\n    ```\n'
        "````python\n```\nd = 4\n````\n"
    )
    assert python_blocks(text) == ["a = 1\n", "b = 2\n    c = 3\n", "```\nd = 4\n"]


@pytest.mark.skipif(not DOCS.is_dir(), reason="docs/ not found (not a repository checkout)")
def test_examples_were_found():
    pages = {param.values[0] for param in EXAMPLES}
    assert "packages/attention-core/README.md" in pages
    assert any(page.startswith("docs/attention-core/") for page in pages)
    assert not any(page.startswith(f"docs/{name}/") for name in MODEL_PACKAGES for page in pages)


EXAMPLE_MODULE = "__docs_example__"


@pytest.fixture
def isolated_registries():
    """Undo what an example registers (classes it defines) and the listeners it adds.

    Registrations made by importing attention_core's own modules stay: they would happen in
    any program that imports them.
    """
    registries = (AttentionRegistry, RecurrentAttentionRegistry, RecurrentCrossAttentionRegistry)
    parameters_before = [set(registry._parameters) for registry in registries]
    dispatchers = dict(EventDispatcher._dispatchers)
    listeners = {key: dict(dispatcher._listeners) for key, dispatcher in dispatchers.items()}
    yield
    for registry, before in zip(registries, parameters_before):
        for key in [k for k, cls in registry._classes.items() if cls.__module__ == EXAMPLE_MODULE]:
            del registry._classes[key], registry._class_params[key]
        used = {p for params in registry._class_params.values() for p in params}
        for parameter in set(registry._parameters) - before - used:
            del registry._parameters[parameter]
    EventDispatcher._dispatchers.clear()
    EventDispatcher._dispatchers.update(dispatchers)
    for key, dispatcher in dispatchers.items():
        dispatcher._listeners.clear()
        dispatcher._listeners.update(listeners[key])


@pytest.mark.parametrize(("page", "code"), EXAMPLES)
def test_example_runs(page: str, code: str, isolated_registries):
    run_example(page, code, module=EXAMPLE_MODULE, threads=torch.get_num_threads())


def nav_pages(text: str) -> list[str]:
    """The Markdown files named in the ``nav:`` section of mkdocs.yml (no YAML parser needed:
    every entry ends with a ``.md`` path)."""
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]
    return re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


@pytest.mark.skipif(not MKDOCS.is_file(), reason="mkdocs.yml not found (not a checkout)")
def test_nav_pages_exist():
    pages = nav_pages(MKDOCS.read_text(encoding="utf-8"))
    assert "index.md" in pages and "migrating.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"pages named in mkdocs.yml's nav but missing from docs/: {missing}"
    for name in ("masking", "builders", "attention"):
        assert f"attention-core/api/{name}.md" in pages
