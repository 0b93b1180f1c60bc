"""Fixtures shared by the attention-core tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def run_programs() -> Callable[[str, dict], dict[str, str]]:
    """Run ``code`` in a fresh interpreter with ``sys.argv[1]`` the cases as JSON, where a crash
    cannot take the test run down; returns the first word and the rest of each line it printed
    (the case's name and its outcome), after asserting that the interpreter did not crash."""

    def run(code: str, cases: dict) -> dict[str, str]:
        command = [sys.executable, "-c", code, json.dumps(cases)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr  # no crash
        return dict(line.split(" ", 1) for line in result.stdout.splitlines())

    return run
