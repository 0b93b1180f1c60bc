"""Lockstep versions: every package has the same version and each model package pins
attention-core to exactly that version (``nox -s compat``). Exits non-zero with the list of
mismatches."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    projects = {
        path.parent.name: tomllib.loads(path.read_text())["project"]
        for path in sorted((ROOT / "packages").glob("*/pyproject.toml"))
    }
    core = projects["attention-core"]["version"]
    problems = []
    for name, project in projects.items():
        init = next((ROOT / "packages" / name / "src").glob("*/__init__.py"))
        declared = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M)
        if project["version"] != core:
            problems.append(f"{name}: version {project['version']} != attention-core {core}")
        if declared is None or declared[1] != project["version"]:
            problems.append(f"{name}: {init.relative_to(ROOT)} __version__ != {project['version']}")
        if name == "attention-core":
            continue
        pins = [d for d in project["dependencies"] if d.startswith("attention-core")]
        if pins != [f"attention-core=={core}"]:
            problems.append(f"{name}: must depend on attention-core=={core}; got {pins}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(projects)} packages at {core}: {'FAIL' if problems else 'OK'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
