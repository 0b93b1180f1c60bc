"""The documentation site builds with ``mkdocs build --strict``, has a page for every package
and for the benchmarks, and no internal link or anchor in it is broken (``nox -s docs``)."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attention-core", "recurrent-transformer", "block-recurrent-transformer",
            "feedback-transformer")  # fmt: skip


class _Links(HTMLParser):
    """Collects ``href``/``src`` targets and element ids of one HTML page."""

    def __init__(self):
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)
            if name == "id" and value:
                self.ids.add(value)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        check=True,
    )
    return out


def parse(page: Path) -> _Links:
    links = _Links()
    links.feed(page.read_text(encoding="utf-8"))
    return links


def test_every_package_and_the_benchmarks_have_pages(site):
    for package in PACKAGES:
        assert (site / package / "index.html").is_file(), package
        api = site / package / ("api/index.html" if package == "attention-core" else "api")
        assert api.exists(), f"{package} has no API reference page"
    for page in ("benchmarks", "migrating", "getting-started", "contributing"):
        assert (site / page / "index.html").is_file(), page


def broken_links(site: Path) -> list[str]:
    """Every internal ``href``/``src`` of the built ``site`` whose page or anchor is missing."""
    pages = {page: parse(page) for page in site.rglob("*.html")}
    broken = []
    for page, links in pages.items():
        for target in links.targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc or target.startswith(("mailto:", "data:")):
                continue
            if parts.path:
                base = site if parts.path.startswith("/") else page.parent  # 404.html: absolute
                resolved = (base / unquote(parts.path).lstrip("/")).resolve()
                if resolved.is_dir():
                    resolved = resolved / "index.html"
            else:
                resolved = page
            if not resolved.exists():
                broken.append(f"{page.relative_to(site)} -> {target}")
                continue
            if parts.fragment and resolved.suffix == ".html":
                ids = pages[resolved].ids if resolved in pages else parse(resolved).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)} -> {target} (no such anchor)")
    return sorted(set(broken))


def test_no_internal_link_or_anchor_is_broken(site):
    broken = broken_links(site)
    assert not broken, "broken links:\n" + "\n".join(broken[:50])


def test_the_link_check_catches_missing_pages_and_anchors(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "index.html").write_text('<h2 id="attention_core.masking">m</h2>')
    (tmp_path / "index.html").write_text(
        '<a href="api/#attention_core.masking">ok</a> <a href="#top">no anchor here</a>'
        '<a href="api/#attention_core.gone">gone</a> <a href="missing/">no page</a>'
        '<a href="https://example.org/#x">external</a>'
    )
    assert broken_links(tmp_path) == [
        "index.html -> #top (no such anchor)",
        "index.html -> api/#attention_core.gone (no such anchor)",
        "index.html -> missing/",
    ]


def test_benchmark_page_shows_measured_tables(site):
    text = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<table>", text), "the benchmark page has no table"


def test_api_pages_render_no_private_object(site):
    """The reference documents public objects only: no ``_private`` module, class or function."""
    imports = tuple(package.replace("-", "_") + "." for package in PACKAGES)
    private = []
    for page in site.rglob("*.html"):
        for anchor in parse(page).ids:
            if anchor.startswith(imports) and any(
                part.startswith("_") and not part.endswith("__") for part in anchor.split(".")
            ):
                private.append(f"{page.relative_to(site)}#{anchor}")
    assert not private, "private objects on the API pages:\n" + "\n".join(sorted(private)[:50])
