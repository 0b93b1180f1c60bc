"""Every ```python block of the package README and of the package's documentation pages
(``docs/recurrent-transformer/*.md``) runs, each in a fresh namespace after
``torch.manual_seed(0)`` (a block carries its own imports). Outside a checkout (no README next
to the tests, no docs/ above them) the tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from attention_core.testing.markdown import markdown_examples, python_blocks, run_example

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[1]
README = PACKAGE / "README.md"
DOCS = ROOT / "docs" / "recurrent-transformer"
EXAMPLES = markdown_examples([README, *sorted(DOCS.glob("*.md"))], ROOT)


def test_the_readme_has_examples():
    if not README.is_file():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 5


def test_the_guide_has_examples():
    if not DOCS.is_dir():
        pytest.skip("docs/recurrent-transformer not found (not a repository checkout)")
    assert len(python_blocks((DOCS / "index.md").read_text(encoding="utf-8"))) >= 5
    pages = {name.rsplit(":", 1)[0] for name, _ in EXAMPLES}
    assert {"packages/recurrent-transformer/README.md",
            "docs/recurrent-transformer/index.md"} <= pages  # fmt: skip


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name, code):
    run_example(name, code, module="recurrent_transformer_example")
