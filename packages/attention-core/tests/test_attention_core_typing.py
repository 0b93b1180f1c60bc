"""The repository's mypy settings (root ``pyproject.toml``) catch a wrong tensor argument type
in user code that calls the public API, also inside an unannotated function."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (nox -s typecheck)")

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "pyproject.toml"

SNIPPET = textwrap.dedent(
    """
    import torch
    from attention_core.causal_product import (
        causal_dot_product,
        elu_normalized_causal_dot_product,
    )
    from attention_core.masking import LengthMask

    Q = torch.randn(1, 2, 3, 4)
    out: torch.Tensor = causal_dot_product(Q, Q, Q)
    both: tuple[torch.Tensor, torch.Tensor] = causal_dot_product(Q, Q, Q, return_state=True)
    bad = elu_normalized_causal_dot_product(Q, Q, 3)
    bad_overload = causal_dot_product(Q, Q, 3)


    def unannotated():
        return LengthMask(3)
    """
)


def run_mypy(tmp_path: Path, code: str) -> tuple[list[str], int]:
    """mypy's error lines for ``code`` under the repository's configuration, and its status."""
    snippet = tmp_path / "user_code.py"
    snippet.write_text(code)
    stdout, stderr, status = mypy_api.run(
        ["--config-file", str(CONFIG), "--no-error-summary", "--show-error-codes", str(snippet)]
    )
    assert status in (0, 1), f"mypy did not run (status {status}):\n{stdout}\n{stderr}"
    return [line for line in stdout.splitlines() if ": error:" in line], status


def test_mypy_settings_catch_a_wrong_tensor_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configuration's paths are relative to the repository root
    errors, status = run_mypy(tmp_path, SNIPPET)
    lines = SNIPPET.splitlines()
    by_line = {int(error.split(":")[1]): error for error in errors}
    bad = lines.index("bad = elu_normalized_causal_dot_product(Q, Q, 3)") + 1
    message = 'Argument 3 to "elu_normalized_causal_dot_product" has incompatible type "int"'
    assert message in by_line[bad]
    assert 'expected "Tensor"' in by_line[bad] and "[arg-type]" in by_line[bad]
    # an overloaded function (return_state selects the return type) is checked as well
    overload = lines.index("bad_overload = causal_dot_product(Q, Q, 3)") + 1
    assert '"Tensor", "Tensor", "int"' in by_line[overload]
    assert "[call-overload]" in by_line[overload]
    # check_untyped_defs: the body of a function without annotations is checked too
    untyped = lines.index("    return LengthMask(3)") + 1
    assert 'Argument 1 to "LengthMask" has incompatible type "int"' in by_line[untyped]
    # the correct calls (and the return_state overloads) pass: exactly the errors above
    assert sorted(by_line) == [bad, overload, untyped], errors
    assert status == 1


def test_mypy_accepts_the_correct_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    good = SNIPPET.replace("(Q, Q, 3)", "(Q, Q, Q)").replace(
        "LengthMask(3)", "LengthMask(torch.tensor([3]))"
    )
    errors, status = run_mypy(tmp_path, good)
    assert errors == [] and status == 0
