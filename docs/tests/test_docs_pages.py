"""The documentation pages read well at a 1400 px wide window: code blocks fit the text
column, the benchmark tables that ``docs/benchmarks.md`` includes nest under its headings and
are narrow enough to show every column, and the plots read on the light and the dark theme.

These checks read the Markdown and SVG sources; they need no site build.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1]
TABLES = DOCS / "benchmarks"
# At 1400 px, with both sidebars, a code block shows 80 characters of the theme's monospace
# font (688 px wide less its padding, 8.2 px a character); longer lines hide behind a scroll bar.
CODE_COLUMNS = 80
# Seven columns of numbers fit the text column of the benchmark page; more hide to the side.
TABLE_COLUMNS = 7
FENCE = re.compile(r"^\s*(```|~~~)")
# Pages whose code blocks still have wider lines; remove an entry once its lines fit.
WIDE_CODE_ALLOWED: set[str] = set()


def pages() -> list[Path]:
    """Every hand-written page (the generated benchmark tables are checked separately)."""
    return [p for p in sorted(DOCS.rglob("*.md")) if TABLES not in p.parents]


def checked_pages() -> list[Path]:
    return [p for p in pages() if str(p.relative_to(DOCS)) not in WIDE_CODE_ALLOWED]


def code_lines(text: str):
    """``(line number, line)`` of every line inside a fenced code block of ``text``."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match and (fence is None or match.group(1) == fence):
            fence = match.group(1) if fence is None else None
            continue
        if fence is not None:
            yield number, line


def test_code_lines_parser():
    text = "a\n```python\nx = 1\n~~~\ny = 2\n```\nb\n~~~\nz\n~~~\n"
    assert list(code_lines(text)) == [(3, "x = 1"), (4, "~~~"), (5, "y = 2"), (9, "z")]


@pytest.mark.parametrize("page", checked_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_code_blocks_fit_the_column(page: Path):
    wide = [
        f"{page.relative_to(DOCS)}:{number}: {len(line)} characters: {line.strip()}"
        for number, line in code_lines(page.read_text(encoding="utf-8"))
        if len(line) > CODE_COLUMNS
    ]
    assert not wide, (
        f"code lines wider than {CODE_COLUMNS} characters (shorten them, or put the expected "
        "output on a line of its own):\n" + "\n".join(wide)
    )


def benchmark_tables() -> list[Path]:
    return sorted(TABLES.glob("*.md"))


@pytest.mark.parametrize("table", benchmark_tables(), ids=lambda p: p.name)
def test_included_tables_nest_under_the_page_headings(table: Path):
    """The pages that include a table give it a ``##`` section: its own headings start at
    ``###``, or they would render as page titles and break the table of contents."""
    headings = [line for line in table.read_text(encoding="utf-8").splitlines()
                if re.match(r"#{1,2} ", line)]  # fmt: skip
    assert not headings, f"{table.name} has top-level headings: {headings}"


@pytest.mark.parametrize("table", benchmark_tables(), ids=lambda p: p.name)
def test_benchmark_tables_are_narrow_enough(table: Path):
    rows = [line for line in table.read_text(encoding="utf-8").splitlines()
            if line.startswith("|")]  # fmt: skip
    widest = max((line.strip().strip("|").count("|") + 1 for line in rows), default=0)
    assert widest <= TABLE_COLUMNS, (
        f"{table.name} has a table of {widest} columns; split or transpose it "
        f"(at most {TABLE_COLUMNS} fit the page)"
    )


def plots() -> list[Path]:
    names = set()
    for page in pages():
        names |= set(re.findall(r"\]\((benchmarks/[\w.-]+\.svg)\)", page.read_text("utf-8")))
    return [DOCS / name for name in sorted(names)]


def test_the_pages_show_plots():
    assert len(plots()) >= 5, plots()


@pytest.mark.parametrize("plot", plots(), ids=lambda p: p.name)
def test_plots_have_no_opaque_background(plot: Path):
    """A white figure background is a glaring box on the dark theme (and black text on it
    vanishes once the background is transparent): the plots are transparent, text not black."""
    assert plot.is_file(), f"{plot.name} is missing"
    svg = plot.read_text(encoding="utf-8")
    background = re.search(r'<g id="patch_1">\s*<path [^>]*?(style="[^"]*")', svg)
    assert background is None or "fill: #ffffff" not in background.group(1), plot.name
    assert "fill: #000000" not in svg and "stroke: #000000" not in svg, (
        f"{plot.name} draws in black, unreadable on the dark theme"
    )
