"""Lockstep versions (``nox -s compat``): one version for every package, written once.

Each package's version lives only in its ``__init__.py`` (``__version__``); its
``pyproject.toml`` declares the version dynamic. Every package has the core's version and each
model package pins attention-core to exactly that version. Exits non-zero with the list of
mismatches. Runs on Python 3.10 and later (reads TOML with ``tomllib``, ``tomli`` or, when
neither is installed, a small reader of the ``[project]`` keys it needs).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_project_table(text: str) -> dict:
    """``version``, ``dynamic`` and ``dependencies`` from a pyproject.toml's ``[project]`` table."""
    match = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if match is None:
        return {}
    body = re.sub(r"#[^\n\"]*$", "", match[1], flags=re.M)  # comments outside strings
    table = {}
    for key, value in re.findall(
        r'^(version|dynamic|dependencies)\s*=\s*(".*?"|\[.*?\])', body, re.M | re.S
    ):
        table[key] = ast.literal_eval(value)  # TOML basic strings and arrays of them
    return table


def load_project(path: Path) -> dict:
    """The ``[project]`` table of ``path``."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            return read_project_table(path.read_text())
    return tomllib.loads(path.read_text())["project"]


def declared_version(package: Path) -> str | None:
    """``__version__`` from the package's ``src/<import name>/__init__.py``."""
    init = next((package / "src").glob("*/__init__.py"))
    found = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M)
    return found[1] if found else None


def problems() -> tuple[str | None, list[str]]:
    """The core's version and every violation of the lockstep rules."""
    packages = {
        path.parent.name: path.parent for path in (ROOT / "packages").glob("*/pyproject.toml")
    }
    core = declared_version(packages["attention-core"])
    found = []
    for name, package in sorted(packages.items()):
        project = load_project(package / "pyproject.toml")
        version = declared_version(package)
        if "version" in project or "version" not in project.get("dynamic", []):
            found.append(f'{name}: pyproject.toml must declare dynamic = ["version"], no version')
        if version is None:
            found.append(f'{name}: no __version__ = "..." line in its __init__.py')
        elif version != core:
            found.append(f"{name}: version {version} != attention-core {core}")
        if name == "attention-core":
            continue
        pins = [d for d in project.get("dependencies", []) if d.startswith("attention-core")]
        if pins != [f"attention-core=={core}"]:
            found.append(f"{name}: must depend on attention-core=={core}; got {pins}")
    return core, found


def main() -> int:
    core, found = problems()
    for problem in found:
        print(problem, file=sys.stderr)
    count = len(list((ROOT / "packages").glob("*/pyproject.toml")))
    print(f"{count} packages at {core}: {'FAIL' if found else 'OK'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
