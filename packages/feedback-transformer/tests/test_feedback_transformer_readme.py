"""Every ```python block of the package README and of its documentation pages
(``docs/feedback-transformer/*.md``) runs, each in a fresh
namespace after ``torch.manual_seed(0)`` (a block carries its own
imports). Outside a checkout (files missing) the tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from attention_core.testing.markdown import markdown_examples, python_blocks, run_example

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[1]
README = PACKAGE / "README.md"
PAGES = [README, *sorted((ROOT / "docs" / "feedback-transformer").glob("*.md"))]
EXAMPLES = markdown_examples(PAGES, ROOT)


def test_the_readme_has_examples():
    if not README.is_file():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(python_blocks(README.read_text())) >= 5


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(name, code):
    run_example(name, code, module="feedback_transformer_example")
